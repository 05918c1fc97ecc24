//! `dancegrpo preprocess`: a prompts file through the FLUX text encoders, or a
//! reference directory converted, into a dataset written shard by shard (and
//! resumed after an interruption).

use std::path::PathBuf;
use std::time::Instant;

use tch::{Device, Tensor};

use super::encode::{FluxTextEncoder, CLIP_LENGTH};
use super::format::{
    absolute, fnv1a64, DatasetInfo, DatasetSource, EmbedDtype, ManifestEntry, FORMAT_NAME,
    FORMAT_VERSION,
};
use super::prompts::{read_prompts, PromptFile};
use super::reference::INDEX_FILE;
use super::reference_set::ReferenceSet;
use super::writer::{DatasetWriter, WriterStart};
use crate::error::{Error, Result};

/// Settings of a preprocessing run from a prompts file.
#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    /// FLUX.1 directory (`tokenizer/`, `tokenizer_2/`, `text_encoder/`, `text_encoder_2/`).
    pub model: PathBuf,
    /// Prompts file, one per line.
    pub prompts: PathBuf,
    /// Output dataset directory.
    pub out: PathBuf,
    /// T5 sequence length `Lt` (FLUX default 512).
    pub max_sequence_length: usize,
    /// Prompts per encoder call.
    pub batch: usize,
    /// Prompts per shard.
    pub shard_size: u64,
    /// Drop prompts containing CJK ideographs.
    pub skip_cjk: bool,
    /// Encoder and stored dtype.
    pub dtype: EmbedDtype,
    /// Device of the encoders.
    pub device: Device,
    /// Stop after writing this many shards (to test resuming).
    pub stop_after_shards: Option<u64>,
}

/// Settings of a conversion from the reference's format.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The reference directory (`videos2caption.json`, `prompt_embed/`, ...).
    pub reference: PathBuf,
    /// Output dataset directory.
    pub out: PathBuf,
    /// Prompts per shard.
    pub shard_size: u64,
    /// Stored dtype (default: the reference's own).
    pub dtype: Option<EmbedDtype>,
    /// Stop after writing this many shards (to test resuming).
    pub stop_after_shards: Option<u64>,
}

/// Where a run stands, after every batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Prompts in the dataset so far (resumed ones included).
    pub done: u64,
    /// Prompts of the whole dataset.
    pub total: u64,
    /// Prompts processed by this run per second.
    pub prompts_per_second: f64,
}

/// A prompt whose ids were cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncated {
    /// Dataset index.
    pub index: u64,
    /// Line of the prompts file (1-based; for converted data the item number).
    pub line: usize,
    /// CLIP ids were cut to 77.
    pub clip: bool,
    /// T5 ids were cut to `Lt`.
    pub t5: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct PreprocessReport {
    /// The dataset description (complete unless `stopped`).
    pub info: DatasetInfo,
    /// Fresh, resumed or already complete.
    pub start: WriterStart,
    /// Prompts processed by this run.
    pub processed: u64,
    /// Seconds of this run (after loading).
    pub seconds: f64,
    /// Prompts processed per second by this run.
    pub prompts_per_second: f64,
    /// Truncated prompts among those processed by this run.
    pub truncated: Vec<Truncated>,
    /// The run stopped early (`stop_after_shards`).
    pub stopped: bool,
}

/// Encodes the prompts of `opts.prompts` into the dataset `opts.out` (resuming it
/// when it was interrupted with the same settings).
pub fn preprocess(
    opts: &PreprocessOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PreprocessReport> {
    if opts.batch == 0 {
        return Err(Error::Input("batch must be >= 1".into()));
    }
    if opts.shard_size == 0 {
        return Err(Error::Input("shard_size must be >= 1".into()));
    }
    let file = read_prompts(&opts.prompts, opts.skip_cjk)?;
    if file.prompts.is_empty() {
        return Err(Error::Input(format!(
            "{}: no prompts ({} empty lines, {} skipped as CJK)",
            opts.prompts.display(),
            file.skipped_empty,
            file.skipped_cjk
        )));
    }
    let encoder = FluxTextEncoder::from_dir(
        &opts.model,
        opts.max_sequence_length,
        opts.dtype.kind(),
        opts.device,
    )?;
    let info = encoders_info(opts, &file, &encoder);
    let mut check = |index: u64, prompt: &str| same_prompt(opts, &file, index, prompt);
    let (writer, start) = DatasetWriter::start(&opts.out, info, &mut check)?;
    let lines: Vec<usize> = file.prompts.iter().map(|p| p.line).collect();
    let skipped = (file.skipped_empty, file.skipped_cjk);
    let texts: Vec<&str> = file.prompts.iter().map(|p| p.text.as_str()).collect();
    run_shards(
        writer,
        start,
        opts.stop_after_shards,
        skipped,
        &lines,
        progress,
        &mut |range, tick| {
            let texts = &texts[range.start as usize..range.end as usize];
            encode_shard(&encoder, texts, opts.batch, tick)
        },
    )
}

/// The description of a dataset encoded from `file` by `encoder` as `opts` say.
fn encoders_info(
    opts: &PreprocessOptions,
    file: &PromptFile,
    encoder: &FluxTextEncoder,
) -> DatasetInfo {
    DatasetInfo {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        source: DatasetSource::Encoders {
            model: absolute(&opts.model),
            prompts_file: opts.prompts.display().to_string(),
            prompts_hash: file.hash(),
            skip_cjk: opts.skip_cjk,
            max_sequence_length: opts.max_sequence_length as u64,
            clip_length: CLIP_LENGTH as u64,
            batch: opts.batch as u64,
            device: match opts.device {
                Device::Cpu => "cpu".into(),
                Device::Cuda(_) => "cuda".into(),
                other => format!("{other:?}").to_lowercase(),
            },
        },
        prompts: file.prompts.len() as u64,
        shard_size: opts.shard_size,
        text_len: encoder.text_len(),
        text_dim: encoder.text_dim(),
        pooled_dim: encoder.pooled_dim(),
        dtype: opts.dtype,
        counts: None,
        complete: false,
    }
}

/// Fails when the dataset's prompt `index` is not `prompt` in the prompts `file`.
fn same_prompt(
    opts: &PreprocessOptions,
    file: &PromptFile,
    index: u64,
    prompt: &str,
) -> Result<()> {
    let manifest = opts.out.join(super::format::MANIFEST_FILE);
    match file.prompts.get(index as usize) {
        Some(p) if p.text == prompt => Ok(()),
        Some(p) => Err(Error::Input(format!(
            "{}: prompt {index} is {prompt:?} in the dataset but {:?} on line {} of {}: the prompts file changed; use the same file or another output directory",
            manifest.display(),
            p.text,
            p.line,
            opts.prompts.display()
        ))),
        None => Err(Error::Input(format!(
            "{}: prompt {index} is {prompt:?} in the dataset but {} has only {} prompts: the prompts file changed",
            manifest.display(),
            opts.prompts.display(),
            file.prompts.len()
        ))),
    }
}

/// Encodes one shard's `texts` in encoder calls of `batch` prompts.
fn encode_shard(
    encoder: &FluxTextEncoder,
    texts: &[&str],
    batch: usize,
    tick: &mut dyn FnMut(u64),
) -> Result<ShardRows> {
    let (mut embeds, mut pooled, mut entries) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in texts.chunks(batch) {
        let out = encoder.encode(chunk)?;
        for (j, text) in chunk.iter().enumerate() {
            let truncated = (Some(out.truncated_clip[j]), Some(out.truncated_t5[j]));
            entries.push((text.to_string(), truncated.0, truncated.1));
        }
        embeds.push(out.prompt_embeds); // (chunk, Lt, d)
        pooled.push(out.pooled); // (chunk, p)
        tick(entries.len() as u64);
    }
    Ok((Tensor::cat(&embeds, 0), Tensor::cat(&pooled, 0), entries))
}

/// Converts the reference directory `opts.reference` into the dataset `opts.out`.
pub fn convert_reference(
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PreprocessReport> {
    if opts.shard_size == 0 {
        return Err(Error::Input("shard_size must be >= 1".into()));
    }
    let set = ReferenceSet::open(&opts.reference)?;
    let index_path = opts.reference.join(INDEX_FILE);
    let dtype = opts.dtype.unwrap_or(set.dtype());
    let info = reference_info(opts, &set, dtype);
    let items = set.items();
    let mut check = |index: u64, prompt: &str| -> Result<()> {
        match items.get(index as usize) {
            Some(it) if it.caption == prompt => Ok(()),
            _ => Err(Error::Input(format!(
                "{}: item {index} differs from the dataset's manifest: the reference changed; use another output directory",
                index_path.display()
            ))),
        }
    };
    let (writer, start) = DatasetWriter::start(&opts.out, info, &mut check)?;
    let lines: Vec<usize> = (1..=items.len()).collect();
    run_shards(
        writer,
        start,
        opts.stop_after_shards,
        (0, 0),
        &lines,
        progress,
        &mut |range, tick| load_shard(&set, range, dtype, tick),
    )
}

/// The description of the dataset converted from the reference `set`.
fn reference_info(opts: &ConvertOptions, set: &ReferenceSet, dtype: EmbedDtype) -> DatasetInfo {
    let (lt, d, p) = set.dims();
    DatasetInfo {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        source: DatasetSource::Reference {
            dir: absolute(&opts.reference),
            index_hash: fnv1a64([set.index_bytes()]),
        },
        prompts: set.items().len() as u64,
        shard_size: opts.shard_size,
        text_len: lt,
        text_dim: d,
        pooled_dim: p,
        dtype,
        counts: None,
        complete: false,
    }
}

/// Reads the reference's items in `range` as one shard in `dtype`.
fn load_shard(
    set: &ReferenceSet,
    range: std::ops::Range<u64>,
    dtype: EmbedDtype,
    tick: &mut dyn FnMut(u64),
) -> Result<ShardRows> {
    let (mut embeds, mut pooled, mut entries) = (Vec::new(), Vec::new(), Vec::new());
    let first = range.start as usize;
    for (i, item) in set.items()[first..range.end as usize].iter().enumerate() {
        let t = set.load(first + i)?;
        embeds.push(t.prompt_embed.to_kind(dtype.kind())); // (Lt, d)
        pooled.push(t.pooled.to_kind(dtype.kind())); // (p,)
        entries.push((item.caption.clone(), None, None));
        if entries.len() % 64 == 0 {
            tick(entries.len() as u64);
        }
    }
    Ok((
        Tensor::stack(&embeds, 0),
        Tensor::stack(&pooled, 0),
        entries,
    ))
}

/// The manifest entries of shard `k`'s `rows` (its first index `start`),
/// noting the truncated prompts with their lines.
fn manifest_entries(
    rows: Vec<(String, Option<bool>, Option<bool>)>,
    start: u64,
    k: u64,
    lines: &[usize],
    truncated: &mut Vec<Truncated>,
) -> Vec<ManifestEntry> {
    (rows.into_iter().enumerate())
        .map(|(r, (prompt, clip, t5))| {
            let index = start + r as u64;
            if clip == Some(true) || t5 == Some(true) {
                truncated.push(Truncated {
                    index,
                    line: lines[index as usize],
                    clip: clip == Some(true),
                    t5: t5 == Some(true),
                });
            }
            ManifestEntry {
                index,
                prompt,
                shard: k,
                offset: r as u64,
                truncated_clip: clip,
                truncated_t5: t5,
            }
        })
        .collect()
}

impl PreprocessReport {
    /// The report of a run that found nothing to do.
    fn nothing_done(info: DatasetInfo, start: WriterStart) -> Self {
        PreprocessReport {
            info,
            start,
            processed: 0,
            seconds: 0.0,
            prompts_per_second: 0.0,
            truncated: Vec::new(),
            stopped: false,
        }
    }
}

type ShardRows = (Tensor, Tensor, Vec<(String, Option<bool>, Option<bool>)>);

/// Makes the rows of the indices in a range, reporting rows done so far.
type MakeShard<'a> = dyn FnMut(std::ops::Range<u64>, &mut dyn FnMut(u64)) -> Result<ShardRows> + 'a;

/// Writes the remaining shards, each made by `make(range of indices)`.
fn run_shards(
    mut writer: DatasetWriter,
    start: WriterStart,
    stop_after: Option<u64>,
    (skipped_empty, skipped_cjk): (u64, u64),
    lines: &[usize],
    progress: &mut dyn FnMut(&Progress),
    make: &mut MakeShard<'_>,
) -> Result<PreprocessReport> {
    let t0 = Instant::now();
    let total = writer.info().prompts;
    if start == WriterStart::Complete {
        let info = DatasetInfo::read(writer.dir())?;
        return Ok(PreprocessReport::nothing_done(info, start));
    }
    let first = writer.next_index();
    let mut truncated = Vec::new();
    let mut written_now = 0u64;
    let mut stopped = false;
    let at = |done: u64| Progress {
        done,
        total,
        prompts_per_second: (done - first) as f64 / t0.elapsed().as_secs_f64().max(1e-9),
    };
    progress(&at(first));
    while writer.shards_done() < writer.info().shard_count() {
        if stop_after.is_some_and(|n| written_now >= n) {
            stopped = true;
            break;
        }
        let k = writer.shards_done();
        let size = writer.info().shard_size;
        let range = k * size..(k * size + writer.info().shard_rows(k));
        let (embeds, pooled, rows) = make(range.clone(), &mut |n| progress(&at(range.start + n)))?;
        let entries = manifest_entries(rows, range.start, k, lines, &mut truncated);
        writer.write_shard(&embeds, &pooled, &entries)?;
        written_now += 1;
        progress(&at(range.end));
    }
    let processed = writer.next_index() - first;
    let seconds = t0.elapsed().as_secs_f64();
    let info = if stopped {
        writer.info().clone()
    } else {
        writer.finish(skipped_empty, skipped_cjk)?
    };
    Ok(PreprocessReport {
        info,
        start,
        processed,
        seconds,
        prompts_per_second: processed as f64 / seconds.max(1e-9),
        truncated,
        stopped,
    })
}
