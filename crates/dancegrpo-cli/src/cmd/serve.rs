//! `dancegrpo serve`: the generation server (HTTP, JSON in, PNG out) over a
//! model directory, a run's newest checkpoint, or the seeded tiny model.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::data::set::SyntheticPrompts;
use dancegrpo::data::FluxTextEncoder;
use dancegrpo::models::PolicyModel;
use dancegrpo::sampler::cache::CacheSetting;
use dancegrpo::serve::embed::{EmbeddingCache, PromptEmbedder, StandIn};
use dancegrpo::serve::request::Limits;
use dancegrpo::serve::{serve, Engine, ServeConfig};
use dancegrpo::train::build::{build_models_for, ModelUse};
use dancegrpo::train::checkpoint;
use dancegrpo::train::config::{DataSource, ModelSource};
use dancegrpo::train::TrainConfig;

/// Arguments of `dancegrpo serve`.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory (`transformer/`, `vae/`, and the text encoders for
    /// free text), a run directory (its newest checkpoint), or `tiny`.
    source: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Most requests sampled together (same size, steps and guidance).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    max_batch: u64,
    /// Most requests waiting; one more is answered 503.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    queue: u64,
    /// Threads answering HTTP requests.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    http_threads: u64,
    /// Largest image side a request may ask for (pixels).
    #[arg(long, default_value_t = 1024)]
    max_side: i64,
    /// Most steps a request may ask for.
    #[arg(long, default_value_t = 100)]
    max_steps: i64,
    /// Steps of a request that names none (default: the run's or the demo's).
    #[arg(long)]
    steps: Option<i64>,
    /// Feature caching of every sampling: `seed` or a TOML inline table.
    #[arg(long)]
    cache: Option<String>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

/// Runs the server until it is stopped.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = super::train::parse_device(&args.device)?;
    let (cfg, checkpoint) = source_config(&args.source)?;
    dancegrpo::precision::set_tf32(cfg.precision.tf32);
    let (model, vae) = build_models_for(&cfg, device, ModelUse::Inference)?;
    if let Some(dir) = &checkpoint {
        checkpoint::load_weights_whole(dir, &model)?;
    }
    let embedder = embedder(&cfg, &model, device)?;
    let s = &cfg.sampler;
    let steps = args.steps.unwrap_or(s.steps);
    let cache = (args.cache.as_deref())
        .map(|c| CacheSetting::parse(c).context("--cache"))
        .transpose()?
        .map(|c| {
            c.resolve(
                steps,
                dancegrpo::models::VelocityModel::cacheable_blocks(&model),
            )
        });
    let config = ServeConfig {
        addr: format!("{}:{}", args.host, args.port),
        max_batch: args.max_batch as usize,
        queue: args.queue as usize,
        http_threads: args.http_threads as usize,
        limits: Limits {
            max_side: args.max_side,
            max_steps: args.max_steps,
            max_prompt: 2000,
            default_steps: steps,
            default_side: s.height,
            default_guidance: s.guidance,
        },
        shift: s.shift,
        cache,
    };
    let engine = Engine {
        model: &model,
        vae: &vae,
        prompts: EmbeddingCache::new(embedder, 4096),
        device,
    };
    serve(&config, engine, &|addr| {
        println!("serving on http://{addr} (POST /generate, GET /health)");
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The configuration (model, prompts, sampler defaults) of `source`, and the
/// checkpoint to load, if any.
fn source_config(source: &str) -> anyhow::Result<(TrainConfig, Option<PathBuf>)> {
    let mut cfg = TrainConfig::tiny_demo();
    if source == "tiny" {
        return Ok((cfg, None));
    }
    let path = Path::new(source);
    if path.join("config.toml").is_file() {
        let run = TrainConfig::load(&path.join("config.toml"), &[])?;
        let ckpt = checkpoint::latest(&path.join("checkpoints"))
            .with_context(|| format!("no complete checkpoint in {}", path.display()))?;
        return Ok((run, Some(ckpt)));
    }
    anyhow::ensure!(
        path.join("transformer").is_dir(),
        "{source}: neither a model directory (transformer/), a run directory (config.toml) nor `tiny`"
    );
    cfg.model = ModelSource::Dir {
        path: path.to_path_buf(),
    };
    Ok((cfg, None))
}

/// FLUX's text encoders when the model directory has them, else the run's
/// synthetic prompts with seeded stand-ins for other text.
fn embedder(
    cfg: &TrainConfig,
    model: &dyn PolicyModel,
    device: tch::Device,
) -> anyhow::Result<Box<dyn PromptEmbedder>> {
    if let ModelSource::Dir { path } = &cfg.model {
        if path.join("text_encoder_2").is_dir() {
            let enc = FluxTextEncoder::from_dir(path, 512, tch::Kind::Float, device)?;
            return Ok(Box::new(enc));
        }
    }
    let (count, seed, text_len) = match &cfg.data {
        DataSource::Synthetic {
            prompts,
            seed,
            text_len,
        } => (*prompts, *seed, *text_len),
        _ => (16, 0, 32),
    };
    let widths = model.text_widths();
    Ok(Box::new(StandIn {
        prompts: SyntheticPrompts {
            count,
            seed,
            text_len,
            text_dim: widths.text,
            pooled_dim: widths.pooled,
        },
    }))
}
