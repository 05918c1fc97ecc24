//! `dancegrpo export --checkpoint DIR --out DIR`: a training checkpoint's
//! transformer as a diffusers directory (`config.json`,
//! `diffusion_pytorch_model.safetensors`) that `FluxTransformer2DModel.from_pretrained`
//! loads: a sharded checkpoint consolidated from its parts (any process count),
//! a whole one copied.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dancegrpo::dist::fsdp::{export, ShardManifest, WEIGHTS};

/// Arguments of `dancegrpo export`.
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (`<run>/checkpoints/iter-N`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The diffusers model directory to write (created).
    #[arg(long)]
    out: PathBuf,
    /// Largest safetensors file (10GB as diffusers; larger weights go into
    /// several files and an index).
    #[arg(long, default_value = "10GB")]
    max_file_size: String,
}

/// Writes the directory.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ckpt = &args.checkpoint;
    let whole = ckpt.join("transformer");
    if whole.join("config.json").is_file() {
        std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
        for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(whole.join(name), args.out.join(name))
                .with_context(|| whole.join(name).display().to_string())?;
        }
    } else if ckpt.join(format!("{WEIGHTS}.shards.json")).is_file() {
        let manifest = ShardManifest::read(ckpt, WEIGHTS)?;
        let max = dancegrpo::plan::parse_memory(&args.max_file_size).context("--max-file-size")?;
        export(ckpt, WEIGHTS, &args.out, max)?;
        eprintln!("export: consolidated {} parts", manifest.world);
    } else if ckpt.join("lora.safetensors").is_file() {
        bail!(
            "{}: a LoRA checkpoint: its pytorch_lora_weights.safetensors is already in the diffusers layout",
            ckpt.display()
        );
    } else {
        bail!(
            "{}: neither transformer/ nor {WEIGHTS}.shards.json: not a training checkpoint",
            ckpt.display()
        );
    }
    println!("{}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
