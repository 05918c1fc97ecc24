//! `dancegrpo train`: GRPO training from a TOML config (or the built-in tiny
//! default), with `--set` overrides, `--resume`, and a progress line per iteration.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use std::time::Duration;

use dancegrpo::dist::{Collective, DistBackend, Launch, ProcessGroup, SingleProcess};
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
    /// Seconds a process waits for the others (joining, and every collective)
    /// when several processes train (torchrun, or WORLD_SIZE > 1).
    #[arg(long, default_value_t = 1800)]
    dist_timeout: u64,
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
    let launch = Launch::from_env()?;
    let (world, rank) = launch.as_ref().map_or((1, 0), |l| (l.world_size, l.rank));
    cfg.check_world(world)?;
    let d = cfg.derived(world);
    if rank == 0 {
        eprintln!(
            "train: {} iterations; per iteration {} prompts x {} = {} samples over {} process(es), {} per process; {} optimizer steps of {} samples each ({} per process)",
            cfg.run.iterations, cfg.run.prompts_per_iteration, cfg.sampler.group_size, d.samples_per_iteration,
            d.world_size, d.samples_per_process, d.optimizer_steps_per_iteration, d.effective_batch,
            d.accumulation_per_process
        );
    }
    if args.dry_run {
        print!("{}", cfg.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let mut device = parse_device(&args.device)?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let collective: Box<dyn Collective> = match &launch {
        None => Box::new(SingleProcess),
        Some(l) => {
            if let Device::Cuda(_) = device {
                device = Device::Cuda(l.local_rank as usize); // one GPU per process
            }
            let timeout = Duration::from_secs(args.dist_timeout);
            let backend = DistBackend::for_device(device);
            Box::new(ProcessGroup::join(l, backend, timeout).with_context(|| {
                format!("joining {world} processes as rank {rank} ({backend:?})")
            })?)
        }
    };
    let resume = if args.resume {
        Resume::Latest
    } else {
        Resume::Fresh
    };
    let tensorboard = cfg.run.tensorboard;
    let mut trainer = Trainer::with_collective(cfg, &args.out, resume, device, collective)
        .with_context(|| format!("setting up the run in {}", args.out.display()))?;
    if trainer.iteration() > 0 && rank == 0 {
        eprintln!("resumed after iteration {}", trainer.iteration());
    }
    if rank == 0 {
        show_stages(&mut trainer);
    }
    match rank {
        0 => trainer.run(&mut print_progress)?,
        _ => trainer.run(&mut |_| {})?,
    }
    if rank == 0 {
        eprintln!();
        println!("run directory: {}", args.out.display());
        if tensorboard {
            let logdir = args.out.join(dancegrpo::train::tensorboard::DIR);
            println!("curves: tensorboard --logdir {}", logdir.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// On a terminal, the stage the current iteration is in, after the last
/// iteration's status line (`| rollout 8/16`, `| update 24/48`).
pub fn show_stages(trainer: &mut Trainer) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let first = format!("iteration {}", trainer.iteration() + 1);
    LAST_LINE.with(|l| *l.borrow_mut() = first);
    trainer.on_stage(Box::new(|stage, done, total| {
        let line = LAST_LINE.with(|l| l.borrow().clone());
        eprint!("\r{line} | {} {done}/{total}\x1b[K", stage.name());
        let _ = std::io::stderr().flush();
    }));
}

thread_local! {
    /// The last status line printed (the stage display repeats it).
    static LAST_LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
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
    let line = format!(
        "[{bar}] {}/{} reward {:+.4} (first {:+.4}) loss {:+.2e} grad {:.3} clip {:.2} {:.2}s/it ETA {:.0}s",
        p.iteration, p.total, m.reward_mean, p.first_reward, m.loss, m.grad_norm, m.clip_fraction,
        p.seconds_per_iteration, left
    );
    match terminal {
        true => eprint!("\r{line}\x1b[K"),
        false => eprintln!("{line}"),
    }
    LAST_LINE.with(|l| *l.borrow_mut() = line);
    let _ = std::io::stderr().flush();
}
