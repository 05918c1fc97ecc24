//! Reading a complete dataset: memory-mapped shards, one prompt at a time.

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::format::{
    parse_manifest, shard_name, DatasetInfo, ManifestEntry, INFO_FILE, MANIFEST_FILE,
    POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS,
};
use super::set::{PromptEntry, PromptSet};
use crate::error::{Error, Result};
use crate::io::safetensors::{dtype_of, SafetensorsFile};

/// A complete prompt-embedding dataset, its shards memory-mapped.
pub struct EmbeddingDataset {
    dir: PathBuf,
    info: DatasetInfo,
    shards: Vec<SafetensorsFile>,
    entries: Vec<ManifestEntry>,
}

impl EmbeddingDataset {
    /// Opens `dir`, checking that it is complete: `dataset.json` with
    /// `complete: true`, one manifest line per prompt, and every shard with
    /// tensors of the announced shapes and dtype.
    pub fn open(dir: &Path) -> Result<Self> {
        let info = DatasetInfo::read(dir)?;
        let info_path = dir.join(INFO_FILE);
        if !info.complete {
            let done = (0..info.shard_count())
                .take_while(|k| dir.join(shard_name(*k)).is_file())
                .count();
            return Err(Error::config(
                &info_path,
                "complete",
                format!(
                    "the dataset is incomplete ({done} of {} shards present; preprocessing was interrupted): rerun the same `dancegrpo preprocess` command to finish it",
                    info.shard_count()
                ),
            ));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        let (entries, bad) = parse_manifest(&manifest_path, &bytes, &info);
        if let Some(msg) = bad {
            return Err(Error::Input(msg));
        }
        if entries.len() as u64 != info.prompts {
            return Err(Error::Input(format!(
                "{}: {} lines, but {} announces {} prompts",
                manifest_path.display(),
                entries.len(),
                info_path.display(),
                info.prompts
            )));
        }
        let shards = (0..info.shard_count())
            .map(|k| open_shard(dir, &info, k))
            .collect::<Result<Vec<_>>>()?;
        Ok(EmbeddingDataset {
            dir: dir.to_path_buf(),
            info,
            shards,
            entries: entries.into_iter().map(|(e, _)| e).collect(),
        })
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The description (`dataset.json`).
    pub fn info(&self) -> &DatasetInfo {
        &self.info
    }

    /// The manifest line of prompt `index`.
    pub fn entry(&self, index: u64) -> Option<&ManifestEntry> {
        self.entries.get(index as usize)
    }

    /// Row `offset` of tensor `name` in shard `shard`, shaped `shape` (a copy).
    fn row(&self, shard: u64, offset: u64, name: &str, shape: &[i64]) -> Result<Tensor> {
        let f = &self.shards[shard as usize];
        let bytes = f.bytes(name)?;
        let kind = self.info.dtype.kind();
        let row = shape.iter().product::<i64>() as usize * kind.elt_size_in_bytes();
        let start = offset as usize * row;
        Ok(Tensor::f_from_data_size(
            &bytes[start..start + row],
            shape,
            kind,
        )?)
    }
}

/// Shard `k` of the dataset in `dir`, its two tensors of the shapes and dtype
/// `info` announces.
fn open_shard(dir: &Path, info: &DatasetInfo, k: u64) -> Result<SafetensorsFile> {
    let path = dir.join(shard_name(k));
    if !path.is_file() {
        let msg = format!(
            "shard {k} of {} is missing from the dataset",
            info.shard_count()
        );
        return Err(Error::not_found(&path, msg));
    }
    let f = SafetensorsFile::open(&path)?;
    let dtype = dtype_of(info.dtype.kind()).expect("f32/bf16");
    let rows = info.shard_rows(k) as i64;
    for (name, shape) in [
        (PROMPT_EMBEDS, vec![rows, info.text_len, info.text_dim]),
        (POOLED_PROMPT_EMBEDS, vec![rows, info.pooled_dim]),
    ] {
        let t = f.info(name).ok_or_else(|| Error::MissingTensor {
            source_desc: path.display().to_string(),
            name: name.to_string(),
        })?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                source_desc: path.display().to_string(),
                name: name.to_string(),
                expected: shape,
                found: t.shape.clone(),
            });
        }
        if t.dtype != dtype {
            let msg = format!(
                "tensor `{name}` is {}, the dataset is {}",
                t.dtype,
                info.dtype.name()
            );
            return Err(Error::Safetensors { path, msg });
        }
    }
    Ok(f)
}

impl PromptSet for EmbeddingDataset {
    fn len(&self) -> u64 {
        self.info.prompts
    }

    fn get(&self, index: u64) -> Result<PromptEntry> {
        let e = self.entry(index).ok_or_else(|| {
            Error::Input(format!(
                "{}: prompt {index} of {}",
                self.dir.display(),
                self.info.prompts
            ))
        })?;
        let i = &self.info;
        Ok(PromptEntry {
            text: self.row(e.shard, e.offset, PROMPT_EMBEDS, &[i.text_len, i.text_dim])?,
            pooled: self.row(e.shard, e.offset, POOLED_PROMPT_EMBEDS, &[i.pooled_dim])?,
            caption: e.prompt.clone(),
        })
    }
}
