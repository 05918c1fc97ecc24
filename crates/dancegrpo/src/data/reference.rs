//! The reference's preprocessed prompts (DanceGRPO
//! `fastvideo/data_preprocess/preprocess_flux_embedding.py`, read by
//! `fastvideo/dataset/latent_flux_rl_datasets.py`):
//!
//! ```text
//! DIR/videos2caption.json      [{"prompt_embed_path": "0.pt", "pooled_prompt_embeds_path": "0.pt",
//!                                "text_ids": "0.pt", "caption": "..."}, ...]
//! DIR/prompt_embed/0.pt        torch.save(prompt_embeds[i])        [Lt, 4096] (bf16 in the reference)
//! DIR/pooled_prompt_embeds/0.pt torch.save(pooled_prompt_embeds[i]) [768]
//! DIR/text_ids/0.pt            torch.save(text_ids[i])             zeros ([3]: a row of the [Lt, 3] ids)
//! ```
//!
//! The `.pt` files are read without executing pickle ([`crate::io::torch_pt`]).

use std::path::{Component, Path, PathBuf};

use tch::Tensor;

use crate::error::{Error, Result};
use crate::io::torch_pt::read_torch_pt_tensor;

/// The index file of a reference directory.
pub const INDEX_FILE: &str = "videos2caption.json";

/// One item of `videos2caption.json`, its paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceItem {
    /// Its position in the list (0-based), named in errors.
    pub entry: usize,
    /// The caption.
    pub caption: String,
    /// `DIR/prompt_embed/<prompt_embed_path>`.
    pub prompt_embed: PathBuf,
    /// `DIR/pooled_prompt_embeds/<pooled_prompt_embeds_path>`.
    pub pooled: PathBuf,
    /// `DIR/text_ids/<text_ids>`.
    pub text_ids: PathBuf,
}

/// One item's tensors.
pub struct ReferenceTensors {
    /// `[Lt, d]`.
    pub prompt_embed: Tensor,
    /// `[p]`.
    pub pooled: Tensor,
}

/// Reads `DIR/videos2caption.json`. Returns the items and the file's bytes
/// (for change detection).
pub fn read_reference_index(dir: &Path) -> Result<(Vec<ReferenceItem>, Vec<u8>)> {
    let path = dir.join(INDEX_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let list = json.as_array().ok_or_else(|| Error::Json {
        path: path.clone(),
        msg: "expected a list of items".into(),
    })?;
    let mut items = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let field = |key: &str| -> Result<&str> {
            item.get(key)
                .and_then(|v| v.as_str())
                .ok_or_else(|| Error::Json {
                    path: path.clone(),
                    msg: format!("item {i}: `{key}` is missing or not a string"),
                })
        };
        let file = |sub: &str, key: &str| -> Result<PathBuf> {
            let name = field(key)?;
            let rel = Path::new(name);
            if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(Error::Json {
                    path: path.clone(),
                    msg: format!(
                        "item {i}: `{key}` = {name:?} is not a relative file name inside {sub}/"
                    ),
                });
            }
            Ok(dir.join(sub).join(rel))
        };
        items.push(ReferenceItem {
            entry: i,
            caption: field("caption")?.to_string(),
            prompt_embed: file("prompt_embed", "prompt_embed_path")?,
            pooled: file("pooled_prompt_embeds", "pooled_prompt_embeds_path")?,
            text_ids: file("text_ids", "text_ids")?,
        });
    }
    Ok((items, bytes))
}

impl ReferenceItem {
    /// Loads the item's tensors, checking their ranks and that `text_ids` are
    /// zeros (`[3]` or `[Lt, 3]`), as FLUX's text position ids are.
    /// A missing file is an error naming it and the item that lists it.
    pub fn load(&self) -> Result<ReferenceTensors> {
        let prompt_embed = self.read(&self.prompt_embed)?;
        let pooled = self.read(&self.pooled)?;
        let text_ids = self.read(&self.text_ids)?;
        let bad = |path: &Path, msg: String| Error::TorchCheckpoint {
            path: path.to_path_buf(),
            msg,
        };
        if prompt_embed.dim() != 2 {
            return Err(bad(
                &self.prompt_embed,
                format!(
                    "prompt embedding has shape {:?}, expected [Lt, d]",
                    prompt_embed.size()
                ),
            ));
        }
        if pooled.dim() != 1 {
            return Err(bad(
                &self.pooled,
                format!(
                    "pooled embedding has shape {:?}, expected [p]",
                    pooled.size()
                ),
            ));
        }
        let ts = text_ids.size();
        let lt = prompt_embed.size()[0];
        if !(ts == [3] || ts == [lt, 3]) {
            return Err(bad(
                &self.text_ids,
                format!("text_ids have shape {ts:?}, expected [3] or [{lt}, 3]"),
            ));
        }
        if text_ids.numel() > 0
            && text_ids
                .to_kind(tch::Kind::Double)
                .abs()
                .max()
                .double_value(&[])
                != 0.0
        {
            return Err(bad(
                &self.text_ids,
                "text_ids are not zeros (FLUX's text position ids are; other ids are not supported)"
                    .into(),
            ));
        }
        Ok(ReferenceTensors {
            prompt_embed,
            pooled,
        })
    }

    /// Reads one of the item's `.pt` files.
    fn read(&self, path: &Path) -> Result<Tensor> {
        if !path.is_file() {
            return Err(Error::not_found(
                path,
                format!("missing, but item {} of {INDEX_FILE} lists it", self.entry),
            ));
        }
        read_torch_pt_tensor(path)
    }
}
