//! `dancegrpo preprocess`: a prompts file through the FLUX text encoders into a
//! prompt-embedding dataset (resumable), or a reference directory converted.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dancegrpo::data::preprocess::Truncated;
use dancegrpo::data::writer::WriterStart;
use dancegrpo::data::{
    convert_reference, preprocess, ConvertOptions, EmbedDtype, PreprocessOptions, PreprocessReport,
    Progress,
};

use super::train::parse_device;

/// Arguments of `dancegrpo preprocess`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompts", "from_reference"])))]
pub struct Args {
    /// FLUX.1 directory (`tokenizer/`, `tokenizer_2/`, `text_encoder/`, `text_encoder_2/`).
    #[arg(long, requires = "prompts")]
    model: Option<PathBuf>,
    /// Prompts file: one prompt per line (UTF-8); empty lines are skipped.
    #[arg(long, requires = "model")]
    prompts: Option<PathBuf>,
    /// Convert the reference's preprocessed directory (`videos2caption.json`,
    /// `prompt_embed/`, `pooled_prompt_embeds/`, `text_ids/`) instead of encoding.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["model", "prompts", "skip_cjk", "batch", "max_sequence_length"])]
    from_reference: Option<PathBuf>,
    /// Output dataset directory (rerun the same command to resume it).
    #[arg(long)]
    out: PathBuf,
    /// T5 sequence length (FLUX: 512).
    #[arg(long, default_value_t = 512)]
    max_sequence_length: usize,
    /// Prompts per encoder call.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Prompts per shard.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    shard_size: u64,
    /// Drop prompts containing CJK ideographs (U+4E00..U+9FFF, as the reference does).
    #[arg(long)]
    skip_cjk: bool,
    /// Encoder and stored dtype: f32 or bf16 (with --from-reference: default the reference's).
    #[arg(long)]
    dtype: Option<String>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch CPU threads (default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// Stop after writing this many shards (for testing resume).
    #[arg(long, hide = true)]
    stop_after_shards: Option<u64>,
}

/// Runs `dancegrpo preprocess`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let dtype = args
        .dtype
        .as_deref()
        .map(|s| {
            EmbedDtype::parse(s)
                .with_context(|| format!("unknown --dtype `{s}` (want f32 or bf16)"))
        })
        .transpose()?;
    let mut printer = ProgressPrinter::default();
    let report = if let Some(reference) = &args.from_reference {
        let opts = ConvertOptions {
            reference: reference.clone(),
            out: args.out.clone(),
            shard_size: args.shard_size,
            dtype,
            stop_after_shards: args.stop_after_shards,
        };
        convert_reference(&opts, &mut |p| printer.print(p))
            .map_err(with_flag)
            .with_context(|| {
                format!(
                    "converting {} into {}",
                    reference.display(),
                    args.out.display()
                )
            })?
    } else {
        let opts = PreprocessOptions {
            model: args.model.clone().expect("clap: --model with --prompts"),
            prompts: args.prompts.clone().expect("clap: --prompts"),
            out: args.out.clone(),
            max_sequence_length: args.max_sequence_length,
            batch: args.batch as usize,
            shard_size: args.shard_size,
            skip_cjk: args.skip_cjk,
            dtype: dtype.unwrap_or(EmbedDtype::F32),
            device: parse_device(&args.device)?,
            stop_after_shards: args.stop_after_shards,
        };
        preprocess(&opts, &mut |p| printer.print(p))
            .map_err(with_flag)
            .with_context(|| format!("preprocessing into {}", args.out.display()))?
    };
    printer.end();
    summarize(&args, &report);
    if report.stopped {
        eprintln!(
            "stopped after {} shards (--stop-after-shards); rerun without it to resume",
            args.stop_after_shards.unwrap_or(0)
        );
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// The flag of `preprocess` that sets a dataset field the library names.
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "source.model" => "--model",
        "source.skip_cjk" => "--skip-cjk",
        "source.max_sequence_length" => "--max-sequence-length",
        "source.batch" => "--batch",
        "source.device" => "--device",
        "source.dir" | "source.kind" => "--from-reference",
        "source.prompts_hash" => "--prompts",
        "shard_size" => "--shard-size",
        "dtype" => "--dtype",
        _ => return None,
    })
}

/// Adds the command-line flag behind a dataset setting the library names (the
/// library speaks of fields; only the CLI knows its flags).
fn with_flag(e: dancegrpo::Error) -> anyhow::Error {
    let flag = match &e {
        dancegrpo::Error::Config { field, .. } => flag_of(field).map(|f| (field.clone(), f)),
        _ => None,
    };
    match flag {
        Some((field, f)) => anyhow::Error::new(e)
            .context(format!("`{field}` is set by {f} (or write another --out)")),
        None => e.into(),
    }
}

fn summarize(args: &Args, r: &PreprocessReport) {
    let info = &r.info;
    match r.start {
        WriterStart::Complete => {
            eprintln!("{} is already complete: nothing to do", args.out.display())
        }
        WriterStart::Resumed { shards } => eprintln!(
            "resumed after {shards} complete shards ({} prompts)",
            (shards * info.shard_size).min(info.prompts)
        ),
        WriterStart::Fresh => {}
    }
    eprintln!(
        "{} prompts in {:.2}s ({:.1} prompts/s) this run; dataset: {} prompts, {} shards, Lt {}, text dim {}, pooled dim {}, {}",
        r.processed,
        r.seconds,
        r.prompts_per_second,
        info.prompts,
        info.shard_count(),
        info.text_len,
        info.text_dim,
        info.pooled_dim,
        info.dtype.name()
    );
    if let Some(c) = &info.counts {
        if args.from_reference.is_none() {
            eprintln!(
                "skipped: {} empty lines, {} CJK prompts{}; truncated: {} prompts for CLIP (77 tokens), {} for T5 ({} tokens)",
                c.skipped_empty,
                c.skipped_cjk,
                if args.skip_cjk { "" } else { " (--skip-cjk off)" },
                c.truncated_clip,
                c.truncated_t5,
                info.text_len
            );
        }
    }
    print_truncated(&r.truncated);
    if let Some(mib) = dancegrpo::process::peak_rss_mib() {
        eprintln!("peak RSS: {mib:.1} MiB");
    }
    println!("dataset: {}", args.out.display());
}

fn print_truncated(list: &[Truncated]) {
    const SHOWN: usize = 10;
    for t in list.iter().take(SHOWN) {
        let which = match (t.clip, t.t5) {
            (true, true) => "CLIP and T5",
            (true, false) => "CLIP",
            _ => "T5",
        };
        eprintln!(
            "  truncated ({which}): prompt {} (line {})",
            t.index, t.line
        );
    }
    if list.len() > SHOWN {
        eprintln!(
            "  ... and {} more (see truncated_* in manifest.jsonl)",
            list.len() - SHOWN
        );
    }
}

/// A status line on stderr, overwritten in place on a terminal; elsewhere a line
/// every tenth of the run.
#[derive(Default)]
struct ProgressPrinter {
    last_tenth: Option<u64>,
    printed: bool,
}

impl ProgressPrinter {
    fn print(&mut self, p: &Progress) {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let tenth = p.done * 10 / p.total.max(1);
        if !terminal {
            if self.last_tenth == Some(tenth) {
                return;
            }
            self.last_tenth = Some(tenth);
        }
        let width = 20;
        let filled = (p.done as usize * width) / p.total.max(1) as usize;
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let left = if p.prompts_per_second > 0.0 {
            format!(
                " ETA {:.0}s",
                (p.total - p.done) as f64 / p.prompts_per_second
            )
        } else {
            String::new()
        };
        let (start, end) = if terminal { ("\r", "   ") } else { ("", "\n") };
        eprint!(
            "{start}[{bar}] {}/{} prompts {:.1} prompts/s{left}{end}",
            p.done, p.total, p.prompts_per_second
        );
        self.printed = terminal;
        let _ = std::io::stderr().flush();
    }

    fn end(&self) {
        if self.printed {
            eprintln!();
        }
    }
}
