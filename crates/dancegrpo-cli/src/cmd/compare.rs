//! `dancegrpo compare`: several methods (config files or built-in members of
//! the flow-GRPO family on the demo's tiny model) trained on the same prompts
//! and seeds, and a side-by-side report (`compare.md`, `compare.json`,
//! `compare.png`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use dancegrpo::compare::{run_all, Method, Report, RunTrace, Settings, BUILT_IN};
use dancegrpo::train::Progress;

/// Arguments of `dancegrpo compare`.
#[derive(clap::Args)]
#[command(after_help = built_in_help())]
pub struct Args {
    /// Methods: TOML config files (named by their stem) or built-in names
    /// (default: dancegrpo mixgrpo flow-grpo-fast).
    methods: Vec<String>,
    /// Iterations of every run (default: the first method's `run.iterations`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    iterations: Option<u64>,
    /// Seeds per method.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    seeds: u64,
    /// The first seed (runs take `seed .. seed + seeds`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train every method (config files too) from this model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override a config value of every method (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Where the runs (`<method>/seed<k>/`) and the report go; finished runs found there are reused.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

fn built_in_help() -> String {
    let mut s = String::from("Built-in methods (the tiny demo with):\n");
    for (name, what, _) in BUILT_IN {
        s.push_str(&format!("  {name:<16} {what}\n"));
    }
    s
}

/// Runs the comparison.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = super::train::parse_device(&args.device)?;
    let methods = methods(&args)?;
    let iterations = args.iterations.unwrap_or(methods[0].config.run.iterations);
    let settings = Settings {
        iterations,
        seeds: args.seeds,
        first_seed: args.seed,
        out: args.out.clone(),
        device,
    };
    std::fs::create_dir_all(&args.out).with_context(|| format!("--out {}", args.out.display()))?;
    eprintln!(
        "compare: {} methods x {} seeds x {iterations} iterations into {}",
        methods.len(),
        args.seeds,
        args.out.display()
    );
    let traces = run_all(&methods, &settings, &mut show_progress, &mut show_finished)?;
    let names: Vec<String> = methods.iter().map(|m| m.name.clone()).collect();
    let report = Report::new(&names, &traces, iterations, args.seeds);
    report.write(&args.out)?;
    println!("{}", report.markdown());
    println!(
        "wrote {0}/compare.md, {0}/compare.json, {0}/compare.png",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The methods to compare (the three built-in ones by default), on `--model` if given.
fn methods(args: &Args) -> anyhow::Result<Vec<Method>> {
    let mut set = args.set.clone();
    if let Some(dir) = &args.model {
        anyhow::ensure!(
            dir.join("transformer").is_dir(),
            "--model {}: not a model directory (no transformer/)",
            dir.display()
        );
        set.insert(0, "model.kind=\"dir\"".into());
        set.insert(1, format!("model.path={:?}", dir.display().to_string()));
    }
    let specs = match args.methods.is_empty() {
        true => vec![
            "dancegrpo".into(),
            "mixgrpo".into(),
            "flow-grpo-fast".into(),
        ],
        false => args.methods.clone(),
    };
    let methods = (specs.iter())
        .map(|s| Method::resolve(s, &set))
        .collect::<dancegrpo::Result<_>>()?;
    Ok(methods)
}

/// One line of progress, rewritten in place.
fn show_progress(name: &str, seed: u64, p: &Progress) {
    eprint!(
        "\r{name} seed {seed}: {}/{} reward {:+.4} {:.2}s/it   ",
        p.iteration, p.total, p.metrics.reward_mean, p.seconds_per_iteration
    );
    let _ = std::io::stderr().flush();
}

/// A finished run's first and last rewards (means of up to 10 iterations).
fn show_finished(name: &str, seed: u64, t: &RunTrace, reused: bool) {
    let k = t.rewards.len().min(10);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let secs: f64 = t.seconds.iter().sum();
    eprintln!(
        "\r{name} seed {seed}: reward {:.3} -> {:.3} in {secs:.1} training seconds{}",
        mean(&t.rewards[..k]),
        mean(&t.rewards[t.rewards.len() - k..]),
        if reused {
            " (finished earlier: reused)"
        } else {
            ""
        }
    );
}
