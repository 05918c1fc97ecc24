//! `dancegrpo bench train CASE_DIR`: full GRPO iterations on any directory in
//! the fixture layout (its transformer, VAE, HPSv2-style reward model, prompt
//! embeddings and `case.json` hyper-parameters), timed per stage.

use std::path::PathBuf;
use std::process::ExitCode;

use dancegrpo::align::{train_config, Case, GrpoCase};
use dancegrpo::dist::Shard;
use dancegrpo::grpo::{run_iteration, AdamW, IterationInputs, NoObserver};
use dancegrpo::models::vae::Vae;
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use dancegrpo::rewards::hps::HpsReward;
use dancegrpo::sampler::draws::{InitNoise, NoisePrecision};
use dancegrpo::sampler::Seeded;
use tch::{Kind, Tensor};

/// Arguments of `dancegrpo bench train`.
#[derive(clap::Args)]
pub struct Args {
    /// A case directory in the fixture layout (`case.json`, `inputs.safetensors`,
    /// `transformer/`, `vae/`, `reward/`).
    case: PathBuf,
    /// Timed iterations (after the warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    iterations: u64,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Samples per model call in rollouts (the reference: 1).
    #[arg(long, default_value_t = 1)]
    rollout_batch: i64,
    /// Per-block activation checkpointing in the update.
    #[arg(long)]
    checkpointing: bool,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = super::train::parse_device(&args.device)?;
    let case = Case::open(&args.case)?;
    let mut g = GrpoCase::load_on(&case, Kind::Float, device)?;
    if args.checkpointing {
        g.model.set_checkpointing(ActivationCheckpointing::PerBlock);
    }
    let vae = Vae::from_dir(&case.dir().join("vae"), Kind::Float, device)?;
    let mut reward = HpsReward::from_dir(&case.dir().join("reward"), tch::Kind::Float, device)?;
    let captions =
        case.strings("batch_captions (order used by the trainer, before repeat_interleave)")?;
    let init = case.input("init_noise")?.size();
    let params: Vec<Tensor> = g.model.parameters().into_iter().map(|(_, p)| p).collect();
    let mut opt = AdamW::new(g.adam, &params);
    let mut train = train_config(&case)?;
    train.sampler.rollout_batch = args.rollout_batch;
    train.sampler.decode_batch = 1;
    let icfg = train.iteration_config();
    let mut times: Vec<[f64; 4]> = Vec::new();
    let shard = Shard::whole(g.cond.samples());
    for it in 0..args.warmup + args.iterations {
        let draws = Seeded {
            seed: 1223627,
            iteration: it,
            prompt_ids: (0..captions.len() as u64).collect(),
            group: g.cond.group(),
            init: InitNoise::SharedPerIteration,
            precision: NoisePrecision::Bf16,
        };
        let inputs = IterationInputs {
            cond: &g.cond,
            prompts: &captions,
            draws: &draws,
            shard: &shard,
            schedule: &g.schedule,
            latent: [init[1], init[2], init[3]],
            report: None,
        };
        let r = run_iteration(
            &g.model,
            &vae,
            &mut reward,
            &mut opt,
            &inputs,
            &icfg,
            &mut NoObserver,
        )?;
        let s = &r.report.seconds;
        eprintln!(
            "iteration {it}{}: rollout {:.3}s decode {:.3}s reward {:.3}s update {:.3}s",
            if it < args.warmup { " (warm-up)" } else { "" },
            s.rollout,
            s.decode,
            s.reward,
            s.update
        );
        if it >= args.warmup {
            times.push([s.rollout, s.decode, s.reward, s.update]);
        }
    }
    report(&case, &args, &times);
    Ok(ExitCode::SUCCESS)
}

fn report(case: &Case, args: &Args, times: &[[f64; 4]]) {
    let n = times.len().max(1) as f64;
    let mean = |k: usize| times.iter().map(|t| t[k]).sum::<f64>() / n;
    let (rollout, decode, reward, update) = (mean(0), mean(1), mean(2), mean(3));
    let total = rollout + decode + reward + update;
    let rss = dancegrpo::process::peak_rss_mib();
    println!(
        "bench train {} ({} iterations, device {}, rollout batch {})",
        case.name(),
        times.len(),
        args.device,
        args.rollout_batch
    );
    println!("  seconds per iteration {total:.4}: rollout {rollout:.4}, decode {decode:.4}, reward {reward:.4}, update {update:.4}");
    println!(
        "  peak resident memory {} MiB",
        rss.map_or("?".into(), |m| format!("{m:.0}"))
    );
    let json = serde_json::json!({
        "case": case.name(), "iterations": times.len(), "device": args.device,
        "threads": tch::get_num_threads(), "rollout_batch": args.rollout_batch,
        "seconds_per_iteration": total, "rollout": rollout, "decode": decode,
        "reward": reward, "update": update, "peak_rss_mib": rss,
    });
    println!("{json}");
}
