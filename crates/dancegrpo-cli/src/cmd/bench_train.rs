//! `dancegrpo bench train CASE_DIR | --preset NAME`: full GRPO iterations on a
//! case in the fixture layout or the benchmark layout (`dancegrpo::bench`),
//! timed per stage, with the transformer's GFLOP per iteration and the rate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::align::Case;
use dancegrpo::bench::profile::{OpProfile, Profiler};
use dancegrpo::bench::{BenchSetup, Layout, Preset};
use dancegrpo::grpo::iteration::StageSeconds;
use dancegrpo::grpo::{FirstWindow, UpdateBatching};
use dancegrpo::models::ActivationCheckpointing;
use dancegrpo::precision::PrecisionConfig;

/// Arguments of `dancegrpo bench train`.
#[derive(clap::Args)]
pub struct Args {
    /// A case directory: the fixture layout (weights and recorded inputs) or the
    /// benchmark layout (`case.json`, configs, `inputs.safetensors`).
    #[arg(required_unless_present = "preset", conflicts_with = "preset")]
    case: Option<PathBuf>,
    /// One of the reference's timing presets, built in: tiny, small, medium.
    #[arg(long, value_parser = str::parse::<Preset>)]
    preset: Option<Preset>,
    /// Timed iterations (after the warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    iterations: u64,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Samples per model call in rollouts (the reference: 1).
    #[arg(long, default_value_t = 1)]
    rollout_batch: i64,
    /// Samples per VAE decode (the reference: 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    decode_batch: i64,
    /// Model batches of the update: `per-sample` (the reference's order, the
    /// default), `rollout` (the rollout's batches) or `window` (every trained
    /// transition of an accumulation window in one batch).
    #[arg(long, default_value = "per-sample", value_parser = parse_batching)]
    update_batching: UpdateBatching,
    /// With `--update-batching window`: at most this many transitions per model
    /// batch (bounds the update's activation memory).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    max_update_rows: Option<i64>,
    /// Where the first accumulation window's velocities come from:
    /// `recompute` (the reference, the default) or `rollout-graphs` (the
    /// rollout evaluates them with gradients and keeps the graphs: one forward
    /// pass fewer per transition of that window, the same values, more memory).
    #[arg(long, default_value = "recompute", value_parser = parse_first_window)]
    first_window: FirstWindow,
    /// Transformer arithmetic: `fp32` (the alignment mode) or `bf16` (float32
    /// master weights and optimizer state, bfloat16 compute, frozen models in
    /// bfloat16, log-probs and ratios in float32).
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Per-block activation checkpointing in the update.
    #[arg(long)]
    checkpointing: bool,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Records every libtorch operator of the timed iterations (libtorch's
    /// profiler), writes the raw events to this file and prints the operators
    /// by self time.
    #[arg(long)]
    profile: Option<PathBuf>,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = super::train::parse_device(&args.device)?;
    let (dir, _cleanup) = case_dir(&args)?;
    let case = Case::open(&dir)?;
    let precision = match args.precision.as_str() {
        "fp32" => PrecisionConfig::default(),
        "bf16" => PrecisionConfig::bf16(),
        other => anyhow::bail!("--precision `{other}`: want fp32 or bf16"),
    };
    let mut setup = BenchSetup::load(&case, &precision, device)?;
    if args.checkpointing {
        setup
            .model
            .set_checkpointing(ActivationCheckpointing::PerBlock);
    }
    setup.train.sampler.rollout_batch = args.rollout_batch;
    setup.train.sampler.decode_batch = args.decode_batch;
    setup.train.optim.update_batching = args.update_batching;
    setup.train.optim.max_update_rows = args.max_update_rows;
    setup.train.optim.first_window = args.first_window;
    if let Some(notice) = setup.train.rollout_batch_notice(1) {
        eprintln!("warning: {notice}");
    }
    let mut opt = setup.optimizer();
    let mut times: Vec<[f64; 4]> = Vec::new();
    let mut each = |it: u64, s: &StageSeconds| {
        let warm = it < args.warmup;
        eprintln!(
            "iteration {it}{}: rollout {:.3}s decode {:.3}s reward {:.3}s update {:.3}s",
            if warm { " (warm-up)" } else { "" },
            s.rollout,
            s.decode,
            s.reward,
            s.update
        );
        if !warm {
            times.push([s.rollout, s.decode, s.reward, s.update]);
        }
    };
    setup.run(&mut opt, 0, args.warmup, &mut each)?;
    let profiler = args
        .profile
        .as_ref()
        .map(|_| Profiler::start())
        .transpose()?;
    setup.run(&mut opt, args.warmup, args.iterations, &mut each)?;
    let ops = match (profiler, &args.profile) {
        (Some(p), Some(path)) => Some(p.stop(path)?),
        _ => None,
    };
    report(&case, &setup, &args, &times)?;
    if let Some(ops) = ops {
        print_profile(&ops, &times);
    }
    Ok(ExitCode::SUCCESS)
}

/// The operators by self time: the 15 largest, their share of the iterations'
/// wall time and their calls per iteration.
fn print_profile(ops: &OpProfile, times: &[[f64; 4]]) {
    let wall: f64 = times.iter().flatten().sum();
    let n = times.len().max(1) as f64;
    println!(
        "  profile: {:.1}% of the wall time is inside libtorch operators",
        100.0 * ops.self_seconds() / wall
    );
    println!(
        "  {:<44} {:>8} {:>10} {:>7}",
        "operator (self time)", "calls/it", "s/it", "share"
    );
    for (name, s) in ops.by_self_time().into_iter().take(15) {
        println!(
            "  {:<44} {:>8.0} {:>10.4} {:>6.1}%",
            name,
            s.calls as f64 / n,
            s.self_seconds / n,
            100.0 * s.self_seconds / wall
        );
    }
}

fn parse_first_window(s: &str) -> Result<FirstWindow, String> {
    match s {
        "recompute" => Ok(FirstWindow::Recompute),
        "rollout-graphs" => Ok(FirstWindow::RolloutGraphs),
        _ => Err(format!("`{s}`: want recompute or rollout-graphs")),
    }
}

fn parse_batching(s: &str) -> Result<UpdateBatching, String> {
    match s {
        "per-sample" => Ok(UpdateBatching::PerSample),
        "rollout" => Ok(UpdateBatching::Rollout),
        "window" => Ok(UpdateBatching::Window),
        _ => Err(format!("`{s}`: want per-sample, rollout or window")),
    }
}

/// Removes a preset's temporary directory when the run ends.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The case directory: the one given, or the preset written to a temporary one.
fn case_dir(args: &Args) -> anyhow::Result<(PathBuf, Cleanup)> {
    match (&args.case, args.preset) {
        (Some(dir), _) => Ok((dir.clone(), Cleanup(None))),
        (None, Some(p)) => {
            let dir = std::env::temp_dir().join(format!(
                "dancegrpo-preset-{}-{}",
                p.name(),
                std::process::id()
            ));
            p.write_to(&dir)
                .with_context(|| format!("writing preset {}", p.name()))?;
            Ok((dir.clone(), Cleanup(Some(dir))))
        }
        (None, None) => anyhow::bail!("give a case directory or --preset"),
    }
}

fn report(case: &Case, setup: &BenchSetup, args: &Args, times: &[[f64; 4]]) -> anyhow::Result<()> {
    let n = times.len().max(1) as f64;
    let mean = |k: usize| times.iter().map(|t| t[k]).sum::<f64>() / n;
    let (rollout, decode, reward, update) = (mean(0), mean(1), mean(2), mean(3));
    let total = rollout + decode + reward + update;
    let rss = dancegrpo::process::peak_rss_mib();
    let f = setup.configured_flops()?;
    let gflop = f.total() / 1e9;
    let rate = |flop: f64, s: f64| if s > 0.0 { flop / 1e9 / s } else { 0.0 };
    let layout = match setup.layout {
        Layout::Fixture => "fixture",
        Layout::Benchmark => "benchmark (seeded weights)",
    };
    println!(
        "bench train {} [{layout}] ({} iterations, device {}, rollout batch {})",
        case.name(),
        times.len(),
        args.device,
        args.rollout_batch
    );
    println!("  seconds per iteration {total:.4}: rollout {rollout:.4}, decode {decode:.4}, reward {reward:.4}, update {update:.4}");
    println!(
        "  transformer {gflop:.3} GFLOP per iteration: {:.1} GFLOP/s overall, rollout {:.1}, update {:.1}",
        rate(f.total(), total),
        rate(f.rollout, rollout),
        rate(f.update, update)
    );
    println!(
        "  peak resident memory {} MiB",
        rss.map_or("?".into(), |m| format!("{m:.0}"))
    );
    let json = serde_json::json!({
        "case": case.name(), "layout": layout, "iterations": times.len(), "device": args.device,
        "threads": tch::get_num_threads(), "rollout_batch": args.rollout_batch,
        "update_batching": format!("{:?}", args.update_batching), "decode_batch": args.decode_batch, "max_update_rows": args.max_update_rows, "precision": args.precision,
        "first_window": args.first_window,
        "seconds_per_iteration": total, "rollout": rollout, "decode": decode,
        "reward": reward, "update": update, "peak_rss_mib": rss,
        "gflop_per_iteration": gflop, "gflop_rollout": f.rollout / 1e9, "gflop_update": f.update / 1e9,
        "gflops": rate(f.total(), total), "gflops_rollout": rate(f.rollout, rollout),
        "gflops_update": rate(f.update, update),
    });
    println!("{json}");
    Ok(())
}
