//! `dancegrpo bench`: benchmarks that print figures (never timed tests).
//! `bench rewards`: images per second of each reward on tiny seeded models (no
//! downloads), printed as a table and one JSON line; `bench train`: see
//! [`super::bench_train`]; `bench generate`: [`super::bench_generate`].

use std::process::ExitCode;
use std::time::Instant;

use dancegrpo::models::clip::{ClipConfig, ClipModel, ImageProcessor};
use dancegrpo::models::open_clip::{OpenClip, OpenClipConfig};
use dancegrpo::rewards::clip_score::{ClipScoreReward, ClipScoreScale, ClipScorer};
use dancegrpo::rewards::hps::{byte_stand_in, HpsReward};
use dancegrpo::rewards::jpeg::{JpegObjective, JpegReward};
use dancegrpo::rewards::pickscore::PickScoreReward;
use dancegrpo::rewards::remote::{LoopbackServer, RemoteConfig, RemoteReward};
use dancegrpo::rewards::{Reward, RewardBatch, Score};
use dancegrpo::rng::Philox;
use dancegrpo::weights::Source;
use tch::{Device, Kind};

/// `dancegrpo bench ...`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Images per second of each reward on tiny seeded models.
    Rewards(RewardsArgs),
    /// Full GRPO iterations on a case directory, timed per stage.
    Train(super::bench_train::Args),
    /// The matmul rate of a device (the peak MFU is reported against).
    Matmul(super::bench_matmul::Args),
    /// ODE sampling with feature caches: speed, and quality against no cache.
    Generate(super::bench_generate::Args),
}

#[derive(clap::Args)]
struct RewardsArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(i64).range(1..))]
    images: i64,
    /// Image side in pixels (square images).
    #[arg(long, default_value_t = 256)]
    size: i64,
    /// Timed batches per reward (after one warm-up batch).
    #[arg(long, default_value_t = 3)]
    repeats: u32,
    /// Device for the reward models: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads (1 by default: tiny models on a shared machine
    /// spend more time in OpenMP barriers than computing with more).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    threads: i32,
}

/// Runs `dancegrpo bench`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Rewards(a) => rewards(a),
        What::Train(a) => super::bench_train::run(a),
        What::Matmul(a) => super::bench_matmul::run(a),
        What::Generate(a) => super::bench_generate::run(a),
    }
}

fn tiny_clip(device: Device) -> anyhow::Result<ClipScorer> {
    let cfg = ClipConfig::tiny();
    let size = cfg.vision_config.image_size;
    let model = ClipModel::new(cfg, Source::Seeded(0), Kind::Float, device)?;
    Ok(ClipScorer::new(
        model,
        ImageProcessor::clip_default(size),
        byte_stand_in(77, 49407),
    ))
}

fn rewards(a: RewardsArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.images >= 1, "--images must be >= 1");
    anyhow::ensure!(a.size >= 8, "--size must be >= 8");
    tch::set_num_threads(a.threads.max(1));
    let device = super::train::parse_device(&a.device)?;
    let images = (Philox::new(7, 0).normal_tensor(&[a.images, a.size, a.size, 3]) * 60.0 + 128.0)
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .to_device(device); // (n, size, size, 3)
    let prompts: Vec<String> = (0..a.images)
        .map(|i| format!("a photo of thing number {i}"))
        .collect();
    let server = LoopbackServer::echo()?;
    let mut list = reward_list(&server, device)?;
    let batch = RewardBatch {
        images: &images,
        prompts: &prompts,
    };
    println!(
        "{} images of {}x{} per batch, {} timed batches, device {:?}, {} threads",
        a.images,
        a.size,
        a.size,
        a.repeats,
        device,
        tch::get_num_threads()
    );
    println!("{:<36} {:>10} {:>12}", "reward", "s/batch", "images/s");
    let mut results = Vec::new();
    for (label, reward) in &mut list {
        let per_batch = time_reward(label, reward.as_mut(), &batch, a.repeats.max(1), device)?;
        let ips = a.images as f64 / per_batch;
        println!("{label:<36} {per_batch:>10.4} {ips:>12.1}");
        results.push(serde_json::json!({
            "reward": reward.name(),
            "label": label,
            "seconds_per_batch": per_batch,
            "images_per_second": ips,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "rewards",
            "images": a.images,
            "size": a.size,
            "device": format!("{device:?}"),
            "threads": tch::get_num_threads(),
            "results": results,
        })
    );
    Ok(ExitCode::SUCCESS)
}

/// Every built-in reward, on tiny seeded models (the remote one on `server`), with its label.
fn reward_list(
    server: &LoopbackServer,
    device: Device,
) -> anyhow::Result<Vec<(&'static str, Box<dyn Reward>)>> {
    let hps = OpenClip::new(
        OpenClipConfig::tiny(),
        Source::Seeded(0),
        Kind::Float,
        device,
    )?;
    let mut remote_cfg = RemoteConfig::new(&server.url(), 30.0, 0);
    remote_cfg.backoff = std::time::Duration::ZERO;
    Ok(vec![
        (
            "jpeg (q95)",
            Box::new(JpegReward::new(JpegObjective::Compressibility, 95)?),
        ),
        (
            "hpsv2 (tiny open_clip, 56 px)",
            Box::new(HpsReward::new(hps, byte_stand_in(77, 0))),
        ),
        (
            "clip_score (tiny HF CLIP, 32 px)",
            Box::new(ClipScoreReward::new(
                tiny_clip(device)?,
                ClipScoreScale::Cosine,
            )),
        ),
        (
            "pickscore (tiny HF CLIP, 32 px)",
            Box::new(PickScoreReward::new(tiny_clip(device)?)),
        ),
        (
            "remote (loopback echo, PNG+base64)",
            Box::new(RemoteReward::new(remote_cfg)?),
        ),
    ])
}

/// Seconds per scored batch over `repeats` batches, after one warm-up batch
/// (an error when the warm-up fails an item).
fn time_reward(
    label: &str,
    reward: &mut dyn Reward,
    batch: &RewardBatch,
    repeats: u32,
    device: Device,
) -> anyhow::Result<f64> {
    let warm = reward.score(batch)?;
    if let Some(Score::Failed(why)) = warm.iter().find(|s| matches!(s, Score::Failed(_))) {
        anyhow::bail!("{label}: {why}");
    }
    let start = Instant::now();
    for _ in 0..repeats {
        reward.score(batch)?;
    }
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    Ok(start.elapsed().as_secs_f64() / repeats as f64)
}
