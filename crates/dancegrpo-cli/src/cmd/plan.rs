//! `dancegrpo plan [CONFIG]`: the memory one training process needs, read from
//! the configuration and the models' `config.json` alone (no weights loaded).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::plan::{parse_memory, plan, MemoryPlan, PlanOptions, GIB};
use dancegrpo::train::config::TrainConfig;

/// Arguments of `dancegrpo plan`.
#[derive(clap::Args)]
pub struct Args {
    /// The run's TOML configuration (default: the built-in tiny one).
    config: Option<PathBuf>,
    /// Override a field (`section.key=value`), as `train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Processes (one per GPU).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    world: i64,
    /// Memory of one device (80GiB, 80GB, 141GB, 24G...).
    #[arg(long, default_value = "80GiB")]
    gpu_memory: String,
    /// T5 tokens per prompt, when the data does not say (default 512; 32 for the tiny model).
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    text_len: Option<i64>,
    /// Memory kept back for the CUDA context and allocator slack.
    #[arg(long, default_value = "2GiB")]
    reserve: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Prints the plan; exit status 1 when it does not fit.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = match &args.config {
        Some(path) => TrainConfig::load(path, &args.set)?,
        None => TrainConfig::tiny_demo()
            .with_overrides(&args.set, Path::new("(built-in tiny default)"))?,
    };
    let opts = PlanOptions {
        world: args.world,
        memory: parse_memory(&args.gpu_memory).context("--gpu-memory")?,
        text_len: args.text_len,
        reserve: parse_memory(&args.reserve).context("--reserve")?,
    };
    let p = plan(&cfg, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        print_table(&p);
    }
    Ok(if p.fits {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `12.34 GiB`, `5.6 MiB`, `789 B`.
fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1048576 => format!("{:.1} KiB", b / 1024.0),
        1048576..1073741824 => format!("{:.1} MiB", b / 1048576.0),
        _ => format!("{:.2} GiB", b / GIB),
    }
}

fn print_table(p: &MemoryPlan) {
    println!(
        "per process, {} process(es), sharding {}: {} trained parameters, {} frozen",
        p.world, p.sharding, p.trained_params, p.frozen_params
    );
    for l in &p.lines {
        println!("  {:<46} {:>12}  {}", l.what, gib(l.bytes), l.detail);
    }
    println!("  {:<46} {:>12}", "total", gib(p.total));
    let t = &p.tflop;
    println!(
        "transformer compute per iteration (all processes): rollout {:.2} TFLOP, update {:.2} TFLOP (+ {:.2} recomputed)",
        t.rollout, t.update, t.recompute
    );
    let verdict = if p.fits { "fits" } else { "does not fit" };
    println!("{verdict} in {} per device", gib(p.memory));
    let smallest = |n: Option<i64>, mode: &str| match n {
        Some(n) => println!("smallest process count that fits with sharding {mode}: {n}"),
        None => println!("no process count up to 1024 fits with sharding {mode}"),
    };
    smallest(p.smallest_world, p.sharding);
    if p.sharding != "full" {
        smallest(p.smallest_world_full, "full");
    }
}
