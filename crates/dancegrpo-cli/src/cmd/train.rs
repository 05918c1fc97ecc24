//! `dancegrpo train`: GRPO training from a TOML config (or the built-in tiny
//! default), with `--set` overrides, `--resume`, and a progress line per iteration.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::train::{Progress, Resume, TrainConfig, Trainer};
use tch::Device;

/// Arguments of `dancegrpo train`.
#[derive(clap::Args)]
pub struct Args {
    /// The run configuration (TOML). Without it: the built-in tiny CPU default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value: `section.key=value` (repeatable), e.g. `run.iterations=10`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run directory (checkpoints, metrics, images).
    #[arg(long, default_value = "runs/tiny")]
    out: PathBuf,
    /// Continue from the run directory's newest complete checkpoint (its config.toml
    /// unless --config is given).
    #[arg(long)]
    resume: bool,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<i32>,
    /// Only print the resolved configuration and derived batch sizes.
    #[arg(long)]
    dry_run: bool,
}

/// Parses `cpu` / `cuda` / `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => anyhow::bail!("unknown device `{s}` (want cpu, cuda or cuda:N)"),
        },
    }
}

fn resolve_config(args: &Args) -> anyhow::Result<TrainConfig> {
    let stored = args.out.join("config.toml");
    let cfg = match (&args.config, args.resume && stored.is_file()) {
        (Some(path), _) => TrainConfig::load(path, &args.set)?,
        (None, true) => TrainConfig::load(&stored, &args.set)?,
        (None, false) => TrainConfig::tiny_demo()
            .with_overrides(&args.set, Path::new("(built-in tiny default)"))?,
    };
    Ok(cfg)
}

/// Runs `dancegrpo train`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = resolve_config(&args)?;
    let world: i64 = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let d = cfg.derived(world);
    eprintln!(
        "train: {} iterations; per iteration {} prompts x {} samples = {} samples over {} process(es): {} prompts / {} samples per process, {} optimizer steps of {} samples each (effective batch {})",
        cfg.run.iterations, cfg.run.prompts_per_iteration, cfg.sampler.group_size, d.samples_per_iteration,
        d.world_size, d.prompts_per_process, d.samples_per_process, d.optimizer_steps_per_iteration,
        cfg.optim.gradient_accumulation, d.effective_batch
    );
    if args.dry_run {
        print!("{}", cfg.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::ensure!(
        world == 1,
        "multi-process training is not implemented yet (WORLD_SIZE={world})"
    );
    let device = parse_device(&args.device)?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let resume = if args.resume {
        Resume::Latest
    } else {
        Resume::Fresh
    };
    let tensorboard = cfg.run.tensorboard;
    let mut trainer = Trainer::new(cfg, &args.out, resume, device)
        .with_context(|| format!("setting up the run in {}", args.out.display()))?;
    if trainer.iteration() > 0 {
        eprintln!("resumed after iteration {}", trainer.iteration());
    }
    trainer.run(&mut print_progress)?;
    eprintln!();
    println!("run directory: {}", args.out.display());
    if tensorboard {
        let logdir = args.out.join(dancegrpo::train::tensorboard::DIR);
        println!("curves: tensorboard --logdir {}", logdir.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// One status line per iteration on stderr, overwritten in place on a terminal;
/// elsewhere (logs) a line every tenth of the run.
pub fn print_progress(p: &Progress) {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let every = (p.total / 10).max(1);
    if !terminal && p.iteration % every != 0 && p.iteration != p.total {
        return;
    }
    let m = p.metrics;
    let left = (p.total - p.iteration) as f64 * p.seconds_per_iteration;
    let width = 20;
    let filled = (p.iteration as usize * width) / p.total.max(1) as usize;
    let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
    let (start, end) = if terminal { ("\r", "   ") } else { ("", "\n") };
    eprint!(
        "{start}[{bar}] {}/{} reward {:+.4} (first {:+.4}) loss {:+.2e} grad {:.3} clip {:.2} {:.2}s/it ETA {:.0}s{end}",
        p.iteration, p.total, m.reward_mean, p.first_reward, m.loss, m.grad_norm, m.clip_fraction,
        p.seconds_per_iteration, left
    );
    let _ = std::io::stderr().flush();
}
