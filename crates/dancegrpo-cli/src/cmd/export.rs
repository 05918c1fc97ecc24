//! `dancegrpo export --checkpoint DIR --out DIR`: a training checkpoint's
//! transformer as a diffusers directory (`config.json`,
//! `diffusion_pytorch_model.safetensors`) that `FluxTransformer2DModel.from_pretrained`
//! loads: a sharded checkpoint consolidated from its parts (any process count),
//! a whole one copied. For a LoRA checkpoint: `--merged DIR` (the run's base
//! with the adapters folded in) or `--adapters DIR` (the adapters alone, in
//! peft's and diffusers' layouts).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dancegrpo::dist::fsdp::{export, ShardManifest, WEIGHTS};
use dancegrpo::train::export::{export_adapters, export_merged};
use dancegrpo::train::TrainConfig;

/// Arguments of `dancegrpo export`.
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (`<run>/checkpoints/iter-N`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The diffusers model directory to write (created).
    #[arg(long, required_unless_present_any = ["merged", "adapters"], conflicts_with_all = ["merged", "adapters"])]
    out: Option<PathBuf>,
    /// LoRA checkpoint: the run's base transformer with the adapters folded in,
    /// as a diffusers directory (created).
    #[arg(long, conflicts_with = "adapters")]
    merged: Option<PathBuf>,
    /// LoRA checkpoint: the adapters alone (`adapter_model.safetensors`,
    /// `adapter_config.json`, `pytorch_lora_weights.safetensors`).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Largest safetensors file (10GB as diffusers; larger weights go into
    /// several files and an index).
    #[arg(long, default_value = "10GB")]
    max_file_size: String,
}

/// Writes the directory.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ckpt = &args.checkpoint;
    if let Some(out) = &args.adapters {
        export_adapters(ckpt, out)?;
        println!("{}", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(out) = &args.merged {
        let run = ckpt.parent().and_then(|p| p.parent()).unwrap_or(ckpt);
        let config = run.join("config.toml");
        let cfg = TrainConfig::load(&config, &[])
            .with_context(|| format!("the run of {} (its config.toml)", ckpt.display()))?;
        export_merged(&cfg, ckpt, out)?;
        println!("{}", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    let Some(out_dir) = &args.out else {
        bail!("give --out, --merged or --adapters");
    };
    let whole = ckpt.join("transformer");
    if whole.join("config.json").is_file() {
        std::fs::create_dir_all(out_dir).with_context(|| out_dir.display().to_string())?;
        for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(whole.join(name), out_dir.join(name))
                .with_context(|| whole.join(name).display().to_string())?;
        }
    } else if ckpt.join(format!("{WEIGHTS}.shards.json")).is_file() {
        let manifest = ShardManifest::read(ckpt, WEIGHTS)?;
        let max = dancegrpo::plan::parse_memory(&args.max_file_size).context("--max-file-size")?;
        export(ckpt, WEIGHTS, out_dir, max)?;
        eprintln!("export: consolidated {} parts", manifest.world);
    } else if ckpt.join("lora.safetensors").is_file() {
        bail!(
            "{}: a LoRA checkpoint: export --merged DIR (base + adapters) or --adapters DIR",
            ckpt.display()
        );
    } else {
        bail!(
            "{}: neither transformer/ nor {WEIGHTS}.shards.json: not a training checkpoint",
            ckpt.display()
        );
    }
    println!("{}", out_dir.display());
    Ok(ExitCode::SUCCESS)
}
