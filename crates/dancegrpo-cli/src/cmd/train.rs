//! `dancegrpo train`: GRPO training from a TOML config (or the built-in tiny
//! default), with `--set` overrides, `--resume`, and a progress line per iteration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use std::time::Duration;

use dancegrpo::dist::{Collective, DistBackend, Launch, ProcessGroup, SingleProcess};
use dancegrpo::train::{Resume, TrainConfig, Trainer};

use super::progress::TrainProgress;
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
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Only print the resolved configuration and derived batch sizes.
    #[arg(long)]
    dry_run: bool,
    /// Seconds a process waits for the others (joining, and every collective)
    /// when several processes train (torchrun, or WORLD_SIZE > 1).
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
    dist_timeout: u64,
}

/// Parses `cpu` / `cuda` / `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let index = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => anyhow::bail!("unknown device `{s}` (want cpu, cuda or cuda:N)"),
        },
    };
    // a device this process cannot reach is named here, not by a libtorch abort later
    let count = tch::Cuda::device_count();
    if !tch::utils::has_cuda() || count == 0 {
        anyhow::bail!(
            "device `{s}`: no CUDA device is usable (this binary was built {} CUDA; `dancegrpo env` says more)",
            if tch::utils::has_cuda() { "with" } else { "without" }
        );
    }
    if index as i64 >= count {
        anyhow::bail!(
            "device `{s}`: only {count} CUDA device(s) (cuda:0 to cuda:{})",
            count - 1
        );
    }
    Ok(Device::Cuda(index))
}

/// The run's configuration: `--config`, else on `--resume` the run's own
/// `config.toml` (required: the built-in default would silently train
/// another run), else the built-in tiny default.
fn resolve_config(args: &Args) -> anyhow::Result<TrainConfig> {
    let stored = args.out.join("config.toml");
    if args.resume && !args.out.is_dir() {
        anyhow::bail!(
            "--resume: {}: no such run directory (nothing was created)",
            args.out.display()
        );
    }
    let cfg = match (&args.config, args.resume) {
        (Some(path), _) => TrainConfig::load(path, &args.set)?,
        (None, true) if stored.is_file() => TrainConfig::load(&stored, &args.set)?,
        (None, true) => anyhow::bail!(
            "--resume: {} has no config.toml, so the run's configuration is unknown; pass the one it was started with as --config",
            args.out.display()
        ),
        (None, false) => TrainConfig::tiny_demo()
            .with_overrides(&args.set, Path::new("(built-in tiny default)"))?,
    };
    Ok(cfg)
}

/// On `--resume` with a configuration other than the run's own, names each
/// changed field, and says when the continuation will differ from the run it
/// resumes (anything but the run's length, cadences and evaluation).
fn report_changes(args: &Args, cfg: &TrainConfig) -> anyhow::Result<()> {
    let stored = args.out.join("config.toml");
    if !args.resume || !stored.is_file() {
        return Ok(());
    }
    let earlier = TrainConfig::load(&stored, &[])?;
    let changes = cfg.changes_from(&earlier);
    for c in &changes {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(absent)".into());
        eprintln!(
            "resume: {} changed: {} -> {}",
            c.field,
            show(&c.before),
            show(&c.after)
        );
    }
    if changes.iter().any(|c| !c.keeps_trajectory()) {
        eprintln!("resume: the continuation will differ from the run that wrote the checkpoint");
    }
    Ok(())
}

/// Runs `dancegrpo train`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = resolve_config(&args)?;
    let launch = Launch::from_env()?;
    let (world, rank) = launch.as_ref().map_or((1, 0), |l| (l.world_size, l.rank));
    if rank == 0 {
        report_changes(&args, &cfg)?;
    }
    cfg.check_world(world)?;
    if rank == 0 {
        print_batch_sizes(&cfg, world);
    }
    let mut device = parse_device(&args.device)?;
    if args.dry_run {
        let mode = cfg.health.memory_check;
        let fits = dancegrpo::plan::check::check_memory(&cfg, world, device, mode)?;
        for w in fits.iter().filter(|_| rank == 0) {
            eprintln!("warning: {w}");
        }
        print!("{}", cfg.to_toml());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let collective = join(launch.as_ref(), &mut device, args.dist_timeout)?;
    let resume = match args.resume {
        true => Resume::Latest,
        false => Resume::Fresh,
    };
    let tensorboard = cfg.run.tensorboard;
    let mut trainer = Trainer::with_collective(cfg, &args.out, resume, device, collective)
        .with_context(|| match resume {
            Resume::Fresh => format!(
                "setting up the run in {} (to continue a run there, pass --resume)",
                args.out.display()
            ),
            Resume::Latest => format!("resuming the run in {}", args.out.display()),
        })?;
    if rank != 0 {
        trainer.run(&mut |_| {})?;
        return Ok(ExitCode::SUCCESS);
    }
    for w in trainer.warnings() {
        eprintln!("warning: {w}");
    }
    if trainer.iteration() > 0 {
        eprintln!("resumed after iteration {}", trainer.iteration());
    }
    let display = TrainProgress::new(trainer.iteration() + 1);
    display.attach(&mut trainer);
    trainer.run(&mut |p| display.iteration(p))?;
    eprintln!();
    print_summary(&args, tensorboard, device);
    Ok(ExitCode::SUCCESS)
}

/// The run's batch sizes, as the configuration and the process count give them.
fn print_batch_sizes(cfg: &TrainConfig, world: i64) {
    let d = cfg.derived(world);
    eprintln!(
        "train: {} iterations; per iteration {} prompts x {} = {} samples over {} process(es), {} per process; {} optimizer steps of {} samples each ({} per process)",
        cfg.run.iterations, cfg.run.prompts_per_iteration, cfg.sampler.group_size, d.samples_per_iteration,
        d.world_size, d.samples_per_process, d.optimizer_steps_per_iteration, d.effective_batch,
        d.accumulation_per_process
    );
}

/// This process's collective: alone, or joined to the others torchrun started
/// (a CUDA process then takes the GPU of its local rank).
pub fn join(
    launch: Option<&Launch>,
    device: &mut Device,
    timeout_s: u64,
) -> anyhow::Result<Box<dyn Collective>> {
    let Some(l) = launch else {
        return Ok(Box::new(SingleProcess));
    };
    if let Device::Cuda(_) = device {
        *device = Device::Cuda(local_gpu(l.local_rank)?); // one GPU per process
    }
    let backend = DistBackend::for_device(*device);
    let group = ProcessGroup::join(l, backend, Duration::from_secs(timeout_s));
    let (world, rank) = (l.world_size, l.rank);
    Ok(Box::new(group.with_context(|| {
        format!("joining {world} processes as rank {rank} ({backend:?})")
    })?))
}

/// The sequence-parallel flags of the sampling commands (`generate`,
/// `bench generate`).
#[derive(clap::Args)]
pub struct SequenceParallelArgs {
    /// Processes sharing every forward pass (Ulysses): launch with
    /// `torchrun --no-python --nproc-per-node N dancegrpo <command> ... --sequence-parallel N`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub sequence_parallel: i64,
    /// Seconds to wait for the other processes (`bench generate`: longer than
    /// the one-process baseline takes).
    #[arg(long, default_value_t = 300)]
    pub dist_timeout: u64,
}

impl SequenceParallelArgs {
    /// Joins the processes torchrun started for `dancegrpo <command>` (none:
    /// one process), refusing a launch of another size than `--sequence-parallel`.
    pub fn join(&self, command: &str, device: &mut Device) -> anyhow::Result<Box<dyn Collective>> {
        let n = self.sequence_parallel;
        let launch = Launch::from_env()?;
        let world = launch.as_ref().map_or(1, |l| l.world_size);
        anyhow::ensure!(
            world == n,
            "--sequence-parallel {n} in {world} process(es): launch it with `torchrun --no-python --nproc-per-node {n} dancegrpo {command} ...`"
        );
        join(launch.as_ref(), device, self.dist_timeout)
    }
}

/// The GPU of the process with local rank `local_rank`: its own index among
/// the visible GPUs, or the only one a launcher left it
/// (`CUDA_VISIBLE_DEVICES` set per process).
fn local_gpu(local_rank: i64) -> anyhow::Result<usize> {
    let isolated = std::env::var_os("CUDA_VISIBLE_DEVICES").is_some();
    pick_gpu(tch::Cuda::device_count(), local_rank, isolated)
}

/// [`local_gpu`] of `visible` GPUs: a single visible GPU serves a process of
/// local rank above 0 only where `CUDA_VISIBLE_DEVICES` is set (a launcher
/// giving each process its own); otherwise several processes would share it
/// and NCCL would fail later with a less clear message.
fn pick_gpu(visible: i64, local_rank: i64, isolated: bool) -> anyhow::Result<usize> {
    match visible {
        1 if local_rank == 0 || isolated => Ok(0),
        n if (0..n).contains(&local_rank) => Ok(local_rank as usize),
        n => anyhow::bail!(
            "LOCAL_RANK {local_rank} but {n} visible GPU(s): start at most {n} processes per node (torchrun --nproc-per-node), or give each its own GPU with CUDA_VISIBLE_DEVICES"
        ),
    }
}

/// Where the run went, how to see its curves, and its peak memory.
fn print_summary(args: &Args, tensorboard: bool, device: Device) {
    println!("run directory: {}", args.out.display());
    if tensorboard {
        let logdir = args.out.join(dancegrpo::train::tensorboard::DIR);
        println!("curves: tensorboard --logdir {}", logdir.display());
    }
    let memory = serde_json::json!({
        "peak_rss_mib": dancegrpo::process::peak_rss_mib(),
        "peak_device_mib": dancegrpo::process::peak_device_mib(device),
        "device": args.device,
    });
    println!("peak memory: {memory}");
}

#[cfg(test)]
mod tests {
    use super::pick_gpu;

    #[test]
    fn each_local_process_gets_its_own_gpu() {
        assert_eq!(pick_gpu(4, 3, false).unwrap(), 3);
        assert_eq!(pick_gpu(1, 0, false).unwrap(), 0);
        // one GPU left to each process by the launcher
        assert_eq!(pick_gpu(1, 2, true).unwrap(), 0);
        // two processes on a node with one GPU, nothing isolating them
        let err = pick_gpu(1, 1, false).unwrap_err().to_string();
        assert!(
            err.contains("LOCAL_RANK 1") && err.contains("1 visible"),
            "{err}"
        );
        assert!(pick_gpu(2, 2, true).is_err());
    }
}
