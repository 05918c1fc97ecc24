//! `dancegrpo`: the command-line front end (a thin layer over the `dancegrpo` library).

mod cmd;

use clap::{Parser, Subcommand};

/// GRPO post-training of flow-matching image generators (DanceGRPO) on libtorch.
#[derive(Parser)]
#[command(name = "dancegrpo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the libtorch version, CUDA/cuDNN availability and device count.
    Env(cmd::env::Args),
    /// Compare our pipeline with a reference case, stage by stage.
    Align(cmd::align::Args),
    /// The built-in tiny GRPO run on the CPU (no downloads): the reward must rise.
    Demo(cmd::demo::Args),
    /// Train several methods (configs or built-in flow-GRPO variants) on the same
    /// prompts and seeds and report their rewards side by side.
    Compare(cmd::compare::Args),
    /// Generate images (deterministic ODE sampling) from a run's checkpoint.
    Generate(cmd::generate::Args),
    /// Serve generation over HTTP (JSON in, PNG out) with request batching.
    Serve(cmd::serve::Args),
    /// GRPO training from a config (or the built-in tiny default).
    Train(cmd::train::Args),
    /// Encode a prompts file with the FLUX text encoders into an embedding
    /// dataset (resumable), or convert the reference's preprocessed directory.
    Preprocess(cmd::preprocess::Args),
    /// Train the built-in tiny FLUX and VAE from scratch on procedural images
    /// (rectified flow) into a model directory the trainer loads.
    Pretrain(cmd::pretrain::Args),
    /// Score image files with a reward (jpeg, hpsv2, clip, pickscore, remote).
    Score(cmd::score::Args),
    /// Benchmarks that print figures (`bench rewards`, `bench train CASE_DIR`).
    Bench(cmd::bench::Args),
    /// The memory one training process needs (from the config and the models'
    /// config.json alone): fits or not, and the smallest process count that fits.
    Plan(cmd::plan::Args),
    /// A checkpoint's transformer as a diffusers directory (sharded ones consolidated).
    Export(cmd::export::Args),
}

fn main() -> std::process::ExitCode {
    // before any thread exists: glibc keeps freed tensors' memory for reuse
    dancegrpo::allocator::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Env(a) => cmd::env::run(a),
        Command::Align(a) => cmd::align::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Preprocess(a) => cmd::preprocess::run(a),
        Command::Pretrain(a) => cmd::pretrain::run(a),
        Command::Score(a) => cmd::score::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Plan(a) => cmd::plan::run(a),
        Command::Export(a) => cmd::export::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// 1 when a run started and went wrong (the health guard stopped it), 2 when
/// the input was refused (arguments, configuration, files), as clap's usage errors.
fn exit_code(e: &anyhow::Error) -> u8 {
    let stopped = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<dancegrpo::error::Error>(),
            Some(dancegrpo::error::Error::Health(_))
        )
    });
    if stopped {
        1
    } else {
        2
    }
}

/// The error and its causes joined by `: `, leaving out a cause its
/// predecessor's message already ends with (an I/O error names its file and cause).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
