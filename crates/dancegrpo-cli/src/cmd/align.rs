//! `dancegrpo align CASE_DIR`: stage-by-stage comparison with a reference case.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dancegrpo::align::{run_case, CaseReport, Stage};

/// Arguments of `dancegrpo align`.
#[derive(clap::Args)]
pub struct Args {
    /// A reference case directory (see shared/fixtures/FORMAT.md).
    case: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Only these stages (comma-separated names); default: every implemented stage.
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Also list every compared tensor.
    #[arg(long, short)]
    verbose: bool,
    /// libtorch CPU threads (1 gives the reference's single-thread reduction order).
    #[arg(long)]
    threads: Option<i32>,
}

/// Runs the comparison; exit status 1 when any stage fails.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut stages = Vec::new();
    for name in &args.stages {
        match Stage::from_name(name) {
            Some(s) => stages.push(s),
            None => bail!(
                "unknown stage `{name}` (stages: {})",
                Stage::ALL
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let mut report =
        run_case(&args.case, &stages).with_context(|| format!("align {}", args.case.display()))?;
    if !args.verbose {
        report.stages.iter_mut().for_each(|s| s.tensors.clear());
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_table(r: &CaseReport) {
    println!("case {}", r.case);
    println!(
        "{:<14} {:<48} {:>10} {:>10} {:>8}  result",
        "stage", "worst tensor", "rel_err", "abs_err", "tol"
    );
    for s in &r.stages {
        println!(
            "{:<14} {:<48} {:>10.3e} {:>10.3e} {:>8.0e}  {}",
            s.name,
            s.worst,
            s.rel_err,
            s.abs_err,
            s.tol,
            if s.pass { "PASS" } else { "FAIL" }
        );
        for t in &s.tensors {
            println!(
                "  {:<60} {:>10.3e} {:>10.3e}  {}",
                t.name,
                t.rel_err,
                t.abs_err,
                if t.pass { "ok" } else { "FAIL" }
            );
        }
    }
    println!("{}", if r.pass { "PASS" } else { "FAIL" });
}
