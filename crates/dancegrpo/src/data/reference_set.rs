//! A reference directory opened for reading, shared by the conversion into a
//! dataset ([`super::convert_reference`]) and by training on it in place
//! (`data.kind = "reference"`): the list is read and checked at once, the
//! shapes and dtype come from the first item, and every other item is loaded
//! when it is asked for and checked against them.

use std::path::{Path, PathBuf};

use super::format::EmbedDtype;
use super::reference::{read_reference_index, ReferenceItem, ReferenceTensors, INDEX_FILE};
use super::set::{PromptEntry, PromptSet};
use crate::error::{Error, Result};

/// The reference's `videos2caption.json` and `.pt` tensors, read one item at a time.
pub struct ReferenceSet {
    dir: PathBuf,
    items: Vec<ReferenceItem>,
    index_bytes: Vec<u8>,
    text_len: i64,
    text_dim: i64,
    pooled_dim: i64,
    dtype: EmbedDtype,
}

impl ReferenceSet {
    /// Reads and checks `DIR/videos2caption.json` (a non-empty list of items
    /// with relative file names) and loads the first item for the shapes and dtype.
    pub fn open(dir: &Path) -> Result<Self> {
        let (items, index_bytes) = read_reference_index(dir)?;
        let first = items.first().ok_or_else(|| Error::Json {
            path: dir.join(INDEX_FILE),
            msg: "the list is empty".into(),
        })?;
        let t = first.load()?;
        let dtype =
            EmbedDtype::from_kind(t.prompt_embed.kind()).ok_or_else(|| Error::TorchCheckpoint {
                path: first.prompt_embed.clone(),
                msg: format!(
                    "dtype {:?} is not supported (f32 or bf16)",
                    t.prompt_embed.kind()
                ),
            })?;
        let (text_len, text_dim) = (t.prompt_embed.size()[0], t.prompt_embed.size()[1]);
        let pooled_dim = t.pooled.size()[0];
        Ok(ReferenceSet {
            dir: dir.to_path_buf(),
            items,
            index_bytes,
            text_len,
            text_dim,
            pooled_dim,
            dtype,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The items, in the order of the list.
    pub fn items(&self) -> &[ReferenceItem] {
        &self.items
    }

    /// The bytes of `videos2caption.json` (for change detection).
    pub fn index_bytes(&self) -> &[u8] {
        &self.index_bytes
    }

    /// Text length `Lt`, text width `d` and pooled width `p` (of the first item).
    pub fn dims(&self) -> (i64, i64, i64) {
        (self.text_len, self.text_dim, self.pooled_dim)
    }

    /// The stored dtype (of the first item).
    pub fn dtype(&self) -> EmbedDtype {
        self.dtype
    }

    /// Loads item `index`, checking that its shapes and dtypes are the first item's.
    pub fn load(&self, index: usize) -> Result<ReferenceTensors> {
        let item = self.items.get(index).ok_or_else(|| {
            Error::Input(format!(
                "{}: item {index} of {}",
                self.dir.join(INDEX_FILE).display(),
                self.items.len()
            ))
        })?;
        let t = item.load()?;
        let (lt, d, p) = self.dims();
        if t.prompt_embed.size() != [lt, d] || t.pooled.size() != [p] {
            return Err(Error::TorchCheckpoint {
                path: item.prompt_embed.clone(),
                msg: format!(
                    "shapes {:?} and {:?} (pooled, {}) differ from the first item's [{lt}, {d}] and [{p}]",
                    t.prompt_embed.size(),
                    t.pooled.size(),
                    item.pooled.display()
                ),
            });
        }
        let kind = self.dtype.kind();
        if t.prompt_embed.kind() != kind || t.pooled.kind() != kind {
            return Err(Error::TorchCheckpoint {
                path: item.prompt_embed.clone(),
                msg: format!(
                    "dtypes {:?} (prompt) and {:?} (pooled) differ from the first item's {}",
                    t.prompt_embed.kind(),
                    t.pooled.kind(),
                    self.dtype.name()
                ),
            });
        }
        Ok(t)
    }
}

impl PromptSet for ReferenceSet {
    fn len(&self) -> u64 {
        self.items.len() as u64
    }

    fn get(&self, index: u64) -> Result<PromptEntry> {
        let t = self.load(index as usize)?;
        Ok(PromptEntry {
            text: t.prompt_embed,
            pooled: t.pooled,
            caption: self.items[index as usize].caption.clone(),
        })
    }
}
