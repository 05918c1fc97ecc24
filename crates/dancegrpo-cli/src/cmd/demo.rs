//! `dancegrpo demo`: the built-in tiny pipeline.

use std::process::ExitCode;

/// Arguments of `dancegrpo demo`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the demo.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
