//! `dancegrpo bench`: benchmarks that print figures (never timed tests).

use std::process::ExitCode;

/// The benchmarks.
#[derive(clap::Subcommand)]
pub enum Bench {
    /// Full GRPO iterations on a case directory, timed per stage.
    Train(super::bench_train::Args),
}

/// Runs a benchmark.
pub fn run(bench: Bench) -> anyhow::Result<ExitCode> {
    match bench {
        Bench::Train(a) => super::bench_train::run(a),
    }
}
