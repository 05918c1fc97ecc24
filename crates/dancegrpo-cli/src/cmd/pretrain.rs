//! `dancegrpo pretrain`: trains the built-in tiny FLUX and VAE from scratch on
//! procedural images (rectified flow) and writes a model directory that
//! `dancegrpo train --set model.kind="dir" --set model.path=DIR` loads.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use dancegrpo::pretrain::{self, PretrainConfig, Stage, StepProgress};
use tch::Device;

/// Arguments of `dancegrpo pretrain`.
#[derive(clap::Args)]
pub struct Args {
    /// The model directory to write (replaced if it holds an earlier pretrain output).
    #[arg(long, default_value = "runs/pretrain")]
    out: PathBuf,
    /// Steps of the VAE stage.
    #[arg(long)]
    vae_steps: Option<u64>,
    /// Steps of the flow (transformer) stage.
    #[arg(long)]
    steps: Option<u64>,
    /// Images per step (both stages).
    #[arg(long)]
    batch: Option<i64>,
    /// Seed of the weights, images and every random draw.
    #[arg(long)]
    seed: Option<u64>,
    /// Peak learning rate (both stages).
    #[arg(long)]
    lr: Option<f64>,
    /// libtorch CPU threads.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
}

fn config(args: &Args) -> PretrainConfig {
    let mut cfg = PretrainConfig::default();
    if let Some(n) = args.vae_steps {
        cfg.vae.steps = n;
    }
    if let Some(n) = args.steps {
        cfg.flow.steps = n;
    }
    if let Some(b) = args.batch {
        (cfg.vae.batch, cfg.flow.batch) = (b, b);
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if let Some(lr) = args.lr {
        (cfg.vae.learning_rate, cfg.flow.learning_rate) = (lr, lr);
    }
    cfg
}

/// Runs `dancegrpo pretrain`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let cfg = config(&args);
    cfg.validate()?;
    eprintln!(
        "pretrain: VAE {} steps then flow {} steps, batches of {}/{}, {}x{} images of {} classes, seed {}, {} thread(s)",
        cfg.vae.steps, cfg.flow.steps, cfg.vae.batch, cfg.flow.batch, cfg.image_size,
        cfg.image_size, cfg.classes, cfg.seed, tch::get_num_threads()
    );
    let start = Instant::now();
    let pre = pretrain::run(&cfg, &args.out, Device::Cpu, &mut print_progress)
        .with_context(|| format!("pretraining into {}", args.out.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    let mut figures = pre.report.figures();
    figures["seconds"] = seconds.into();
    figures["threads"] = tch::get_num_threads().into();
    figures["peak_rss_mib"] = dancegrpo::process::peak_rss_mib().into();
    figures["out"] = args.out.display().to_string().into();
    eprintln!(
        "pretrain: done in {seconds:.1}s; wrote {0}/transformer, {0}/vae, {0}/samples.png, {0}/loss.png, {0}/pretrain.json",
        args.out.display()
    );
    let mut sets = vec![
        "model.kind=\"dir\"".to_string(),
        format!("model.path=\"{}\"", args.out.display()),
    ];
    sets.extend(pretrain::trainer_settings(&cfg));
    let sets: Vec<String> = sets.iter().map(|s| format!("--set '{s}'")).collect();
    eprintln!("train on it: dancegrpo train {}", sets.join(" "));
    println!("{figures}");
    Ok(ExitCode::SUCCESS)
}

/// A progress line on stderr: the first step, every twentieth of a stage and its last step.
fn print_progress(p: &StepProgress) {
    let every = (p.total / 20).max(1);
    if p.step != 1 && p.step % every != 0 && p.step != p.total {
        return;
    }
    let stage = match p.stage {
        Stage::Vae => "vae ",
        Stage::Flow => "flow",
    };
    eprintln!(
        "[{stage}] step {}/{} loss {:.5} {:.3}s/step",
        p.step, p.total, p.loss, p.seconds_per_step
    );
    let _ = std::io::stderr().flush();
}
