//! The on-disk layout of a prompt-embedding dataset.
//!
//! ```text
//! DATASET/
//!   dataset.json            format, version, settings, shapes, dtype; `complete: true` written last
//!   manifest.jsonl          one line per prompt: index, prompt, shard, offset, truncated_clip, truncated_t5
//!   shard-00000.safetensors prompt_embeds [n, Lt, d], pooled_prompt_embeds [n, p] (f32 or bf16)
//!   shard-00001.safetensors ...
//! ```
//!
//! Every shard but the last holds `shard_size` prompts; prompt `i` is row
//! `i % shard_size` of shard `i / shard_size`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Kind;

use crate::error::{Error, Result};

/// The `format` field of `dataset.json`.
pub const FORMAT_NAME: &str = "dancegrpo-prompt-embeddings";
/// The format version this library writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The dataset description, written first (`complete: false`) and last (`complete: true`).
pub const INFO_FILE: &str = "dataset.json";
/// One JSON line per prompt, appended after the prompt's shard is in place.
pub const MANIFEST_FILE: &str = "manifest.jsonl";
/// The text-embedding tensor of a shard, `[n, Lt, d]`.
pub const PROMPT_EMBEDS: &str = "prompt_embeds";
/// The pooled-embedding tensor of a shard, `[n, p]`.
pub const POOLED_PROMPT_EMBEDS: &str = "pooled_prompt_embeds";

/// The file name of shard `index`.
pub fn shard_name(index: u64) -> String {
    format!("shard-{index:05}.safetensors")
}

/// Element type of the stored embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmbedDtype {
    /// float32.
    F32,
    /// bfloat16.
    Bf16,
}

impl EmbedDtype {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            EmbedDtype::F32 => Kind::Float,
            EmbedDtype::Bf16 => Kind::BFloat16,
        }
    }

    /// The dtype of a libtorch kind, if it is one of ours.
    pub fn from_kind(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Float => Some(EmbedDtype::F32),
            Kind::BFloat16 => Some(EmbedDtype::Bf16),
            _ => None,
        }
    }

    /// Parses `f32` / `bf16` (also `float32`, `bfloat16`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" | "float32" => Some(EmbedDtype::F32),
            "bf16" | "bfloat16" => Some(EmbedDtype::Bf16),
            _ => None,
        }
    }

    /// The short name (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            EmbedDtype::F32 => "f32",
            EmbedDtype::Bf16 => "bf16",
        }
    }
}

/// What produced a dataset: the settings a resumed run must repeat exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatasetSource {
    /// `dancegrpo preprocess --model DIR --prompts FILE`: the FLUX text encoders.
    Encoders {
        /// The FLUX.1 directory (absolute).
        model: String,
        /// The prompts file as given (informative; its contents are checked by hash).
        prompts_file: String,
        /// FNV-1a 64 of the kept prompts, each followed by `\n` (hex).
        prompts_hash: String,
        /// Whether prompts with CJK ideographs were dropped.
        skip_cjk: bool,
        /// T5 sequence length (`Lt`).
        max_sequence_length: u64,
        /// CLIP sequence length.
        clip_length: u64,
        /// Prompts per encoder call (batched kernels round differently in the
        /// last bits, so a resumed run must use the same batches).
        batch: u64,
        /// Device type of the encoders (`cpu`, `cuda`), for the same reason.
        device: String,
    },
    /// `dancegrpo preprocess --from-reference DIR`: converted `.pt` files.
    Reference {
        /// The reference directory (absolute).
        dir: String,
        /// FNV-1a 64 of `videos2caption.json` (hex).
        index_hash: String,
    },
}

/// Totals, known once the dataset is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DatasetCounts {
    /// Shards written.
    pub shards: u64,
    /// Prompts whose CLIP ids were cut to 77.
    pub truncated_clip: u64,
    /// Prompts whose T5 ids were cut to `Lt`.
    pub truncated_t5: u64,
    /// Empty or whitespace-only lines skipped.
    pub skipped_empty: u64,
    /// Prompts dropped by `--skip-cjk`.
    pub skipped_cjk: u64,
}

/// `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Always [`FORMAT_VERSION`].
    pub version: u32,
    /// What produced the embeddings.
    pub source: DatasetSource,
    /// Number of prompts (the whole dataset, also while incomplete).
    pub prompts: u64,
    /// Prompts per shard (the last shard may hold fewer).
    pub shard_size: u64,
    /// Text length `Lt`.
    pub text_len: i64,
    /// Text embedding width `d`.
    pub text_dim: i64,
    /// Pooled embedding width `p`.
    pub pooled_dim: i64,
    /// Element type of both tensors.
    pub dtype: EmbedDtype,
    /// Totals (`null` until complete).
    pub counts: Option<DatasetCounts>,
    /// Written `true` last: a dataset without it is half-written.
    pub complete: bool,
}

impl DatasetInfo {
    /// Number of shards the dataset has when complete.
    pub fn shard_count(&self) -> u64 {
        self.prompts.div_ceil(self.shard_size.max(1))
    }

    /// Rows of shard `k`.
    pub fn shard_rows(&self, k: u64) -> u64 {
        let start = k * self.shard_size;
        self.shard_size.min(self.prompts.saturating_sub(start))
    }

    /// Serialised as written: pretty JSON and a final newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("serialisable") + "\n"
    }

    /// Reads `DIR/dataset.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(INFO_FILE);
        if !path.is_file() {
            return Err(Error::not_found(
                &path,
                format!(
                    "{} is not a prompt dataset ({INFO_FILE} is missing)",
                    dir.display()
                ),
            ));
        }
        let info: DatasetInfo = crate::io::json::read_json(&path)?;
        if info.format != FORMAT_NAME || info.version != FORMAT_VERSION {
            return Err(Error::config(
                &path,
                "format",
                format!(
                    "`{}` version {} is not `{FORMAT_NAME}` version {FORMAT_VERSION}",
                    info.format, info.version
                ),
            ));
        }
        if info.shard_size == 0 {
            return Err(Error::config(&path, "shard_size", "must be >= 1"));
        }
        Ok(info)
    }
}

/// One line of `manifest.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Position in the dataset (0-based, consecutive).
    pub index: u64,
    /// The prompt (caption).
    pub prompt: String,
    /// Shard number.
    pub shard: u64,
    /// Row in the shard.
    pub offset: u64,
    /// CLIP ids were truncated (`null`: unknown, e.g. converted reference data).
    pub truncated_clip: Option<bool>,
    /// T5 ids were truncated (`null`: unknown).
    pub truncated_t5: Option<bool>,
}

impl ManifestEntry {
    /// The line as written (JSON and `\n`).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("serialisable") + "\n"
    }
}

/// Parses the complete lines of a manifest. Returns the entries of the leading
/// lines that parse and are consistent with `info`, each with the byte offset
/// just after its line, and a description of the first bad line (if any).
pub(crate) fn parse_manifest(
    path: &Path,
    bytes: &[u8],
    info: &DatasetInfo,
) -> (Vec<(ManifestEntry, u64)>, Option<String>) {
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut line_no = 0u64;
    while start < bytes.len() {
        let Some(rel) = bytes[start..].iter().position(|&b| b == b'\n') else {
            return (
                out,
                Some(format!(
                    "{}: line {} is cut short (no newline)",
                    path.display(),
                    line_no + 1
                )),
            );
        };
        let end = start + rel + 1;
        line_no += 1;
        let bad = |msg: String| Some(format!("{}: line {line_no}: {msg}", path.display()));
        let entry: ManifestEntry = match serde_json::from_slice(&bytes[start..end - 1]) {
            Ok(e) => e,
            Err(e) => return (out, bad(format!("invalid JSON: {e}"))),
        };
        let i = line_no - 1;
        let want = (i, i / info.shard_size, i % info.shard_size);
        if (entry.index, entry.shard, entry.offset) != want {
            return (
                out,
                bad(format!(
                    "index/shard/offset ({}, {}, {}) should be {want:?}",
                    entry.index, entry.shard, entry.offset
                )),
            );
        }
        if i >= info.prompts {
            return (
                out,
                bad(format!("more lines than the {} prompts", info.prompts)),
            );
        }
        out.push((entry, end as u64));
        start = end;
    }
    (out, None)
}

/// FNV-1a 64 of `bytes`, as 16 hex digits (change detection, not security).
pub fn fnv1a64(chunks: impl IntoIterator<Item = impl AsRef<[u8]>>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in chunks {
        for &b in chunk.as_ref() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// `path` made absolute (canonical when it exists), as a string for `dataset.json`.
pub fn absolute(path: &Path) -> String {
    let p: PathBuf = std::fs::canonicalize(path).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    });
    p.display().to_string()
}
