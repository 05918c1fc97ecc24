//! `dancegrpo score`: scores image files with one reward and prints one line per
//! image plus a JSON line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::io::image::read_image;
use dancegrpo::rewards::spec::{RewardSpec, CLI_FORMS};
use dancegrpo::rewards::{score_by_size, Score};
use tch::Tensor;

/// Arguments of `dancegrpo score`.
#[derive(clap::Args)]
pub struct Args {
    /// The reward: jpeg, jpeg:incompressibility, hpsv2:DIR, clip:DIR,
    /// clip-torchmetrics:DIR, pickscore:DIR or remote:URL.
    #[arg(long, value_name = "SPEC")]
    reward: String,
    /// One prompt for every image.
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A text file with one prompt per line, one line per image (in order).
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Device for the reward model: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// PNG or JPEG files (RGB or grayscale).
    #[arg(required = true, value_name = "IMAGES")]
    images: Vec<PathBuf>,
}

/// Runs `dancegrpo score`; exit 1 when an image could not be scored.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let device = super::train::parse_device(&args.device)?;
    let spec = RewardSpec::parse_cli(&args.reward)
        .with_context(|| format!("--reward (one of: {CLI_FORMS})"))?;
    let prompts = prompts(&args)?;
    let images = args
        .images
        .iter()
        .map(|p| read_image(p).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<Tensor>>>()?;
    let mut reward = spec
        .build(device)
        .with_context(|| format!("--reward {}", args.reward))?;
    let scores = score_by_size(reward.as_mut(), &images, &prompts)?;
    let mut items = Vec::new();
    let mut failed = 0;
    for (path, s) in args.images.iter().zip(scores) {
        match s {
            Score::Value(v) => {
                println!("{v:.6}\t{}", path.display());
                items.push(serde_json::json!({"path": path, "score": v}));
            }
            Score::Failed(why) => {
                failed += 1;
                println!("FAILED\t{}\t{why}", path.display());
                items.push(serde_json::json!({"path": path, "score": null, "error": why}));
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "reward": reward.name(),
            "spec": args.reward,
            "images": items,
            "failed": failed,
        })
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One prompt per image: `--prompt` for all, or the lines of `--prompts`.
fn prompts(args: &Args) -> anyhow::Result<Vec<String>> {
    match (&args.prompt, &args.prompts) {
        (Some(p), None) => Ok(vec![p.clone(); args.images.len()]),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--prompts {}", file.display()))?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            anyhow::ensure!(
                lines.len() == args.images.len(),
                "--prompts {}: {} lines for {} images (one prompt per image)",
                file.display(),
                lines.len(),
                args.images.len()
            );
            Ok(lines)
        }
        _ => anyhow::bail!("give --prompt TEXT or --prompts FILE"),
    }
}
