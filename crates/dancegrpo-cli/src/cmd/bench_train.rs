//! `dancegrpo bench train CASE_DIR`: full GRPO iterations on any directory in
//! the fixture layout (its transformer, VAE, HPSv2-style reward model, prompt
//! embeddings and `case.json` hyper-parameters), timed per stage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::align::{Case, GrpoCase};
use dancegrpo::grpo::{
    run_iteration, AdamW, Grouping, IterationConfig, IterationInputs, NoObserver, RewardMixing,
};
use dancegrpo::models::vae::Vae;
use dancegrpo::models::{ActivationCheckpointing, VelocityModel};
use dancegrpo::rewards::hps::HpsReward;
use dancegrpo::sampler::draws::{InitNoise, NoisePrecision};
use dancegrpo::sampler::rollout::RolloutSettings;
use dancegrpo::sampler::Seeded;
use tch::{Kind, Tensor};

/// Arguments of `dancegrpo bench train`.
#[derive(clap::Args)]
pub struct Args {
    /// A case directory in the fixture layout (`case.json`, `inputs.safetensors`,
    /// `transformer/`, `vae/`, `reward/`).
    case: PathBuf,
    /// Timed iterations (after the warm-up).
    #[arg(long, default_value_t = 3)]
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
    #[arg(long)]
    threads: Option<i32>,
}

/// Peak resident memory of this process in MiB (`VmHWM`), if the platform reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn batch_captions(case: &Case) -> anyhow::Result<Vec<String>> {
    let path = case.dir().join("case.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let key = "batch_captions (order used by the trainer, before repeat_interleave)";
    json[key]
        .as_array()
        .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
        .with_context(|| format!("{}: `{key}` is not a list of strings", path.display()))
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
    let mut reward = HpsReward::from_dir(&case.dir().join("reward"), device)?;
    let captions = batch_captions(&case)?;
    let init = case.input("init_noise")?.size();
    let params: Vec<Tensor> = g.model.parameters().into_iter().map(|(_, p)| p).collect();
    let mut opt = AdamW::new(g.adam, &params);
    let grouping = match case.hyper("use_group")?.as_bool() {
        Some(false) => Grouping::Global,
        _ => Grouping::PerPrompt {
            size: case.group_size()?,
        },
    };
    let icfg = IterationConfig {
        rollout: RolloutSettings {
            eta: g.cfg.eta,
            batch: args.rollout_batch,
        },
        decode_batch: 1,
        grouping,
        adv_clip_max: case.hyper_f64("adv_clip_max")?,
        mixing: RewardMixing::Reward,
        update: g.cfg,
    };
    let mut times: Vec<[f64; 4]> = Vec::new();
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
            schedule: &g.schedule,
            latent: [init[1], init[2], init[3]],
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
    let rss = peak_rss_mib();
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
