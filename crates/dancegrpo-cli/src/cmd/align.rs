//! `dancegrpo align CASE_DIR`: stage-by-stage comparison with a reference case.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dancegrpo::align::{run_case_on, CaseReport, Precision, Stage};

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
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Arithmetic of the run: `f32` (judged against the float64 truth relative to
    /// the reference's own float32 error), `f64` (the whole engine in float64,
    /// judged against the truth directly) or `bf16` (training's mixed precision,
    /// its errors reported as figures).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    precision: Precision,
    /// Device the stages compute on: `cpu` or `cuda:N` (comparisons on the CPU;
    /// TF32 stays off).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn parse_precision(name: &str) -> Result<Precision, String> {
    Precision::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Precision::ALL.iter().map(|p| p.name()).collect();
        format!(
            "unknown precision `{name}` (precisions: {})",
            names.join(", ")
        )
    })
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
    let device = super::train::parse_device(&args.device)?;
    dancegrpo::precision::set_tf32(false);
    let mut report = run_case_on(&args.case, &stages, args.precision, device)
        .with_context(|| format!("align {}", args.case.display()))?;
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

/// `1.234e-5`, `-` when absent, `report` for the unbounded (bf16) figures.
fn sci(x: Option<f64>) -> String {
    match x {
        None => "-".into(),
        Some(v) if v == f64::INFINITY => "report".into(),
        Some(v) => format!("{v:.3e}"),
    }
}

fn print_table(r: &CaseReport) {
    println!("case {} ({})", r.case, r.precision.name());
    println!(
        "{:<14} {:<52} {:>10} {:>10} {:>10} {:>10}  result",
        "stage", "worst tensor (closest to its bound)", "vs ref", "vs truth", "ref err", "bound"
    );
    for s in &r.stages {
        println!(
            "{:<14} {:<52} {:>10} {:>10} {:>10} {:>10}  {}",
            s.name,
            s.worst,
            sci(Some(s.rel_err)),
            sci(s.truth_err),
            sci(s.ref_err),
            sci(Some(s.bound)),
            if s.pass { "PASS" } else { "FAIL" }
        );
        for t in &s.tensors {
            println!(
                "  {:<64} {:>10} {:>10} {:>10} {:>10}  {}",
                t.name,
                sci(Some(t.rel_err)),
                sci(t.truth_err),
                sci(t.ref_err),
                sci(Some(t.bound)),
                if t.pass { "ok" } else { "FAIL" }
            );
        }
    }
    println!(
        "vs ref: ||ours - expected|| / ||expected||; vs truth: ||ours - truth|| / ||truth||; \
         ref err: ||expected - truth|| / ||truth||; bound: on vs truth (on vs ref without a truth)"
    );
    println!("{}", if r.pass { "PASS" } else { "FAIL" });
}
