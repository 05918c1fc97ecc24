//! Text tokenizers of the prompt encoders and the reward model, exact to the
//! reference: T5 through Hugging Face's `tokenizers` crate (what
//! `T5TokenizerFast` runs), CLIP written here (the reference's CLIP tokenizers
//! are Python: transformers' slow `CLIPTokenizer` and open_clip's
//! `SimpleTokenizer`; see [`clip`]).
//!
//! * [`ClipTokenizer`]: CLIP byte-level BPE with the `</w>` end-of-word suffix, read
//!   from a HF `tokenizer.json`, a `vocab.json` + `merges.txt` pair, or open_clip's
//!   `bpe_simple_vocab_16e6.txt.gz` (with open_clip's own text cleaning).
//! * [`T5Tokenizer`]: T5 Unigram (the `tokenizers` crate), read from a HF
//!   `tokenizer.json` or a sentencepiece `spiece.model`.
//!
//! Both return an [`Encoding`] of fixed length (truncated, then padded); [`batch_ids`]
//! stacks encodings into the int64 id tensor the text encoders take.

mod added;
mod clean;
pub mod clip;
mod clip_files;
mod config;
mod mojibake;
mod normalize;
mod spiece;
pub mod t5;

pub use clip::{ClipTokenizer, TextHandling};
pub use t5::T5Tokenizer;

use tch::Tensor;

use crate::error::{Error, Result};

/// The ids of one encoded prompt, truncated and padded to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids, special tokens and padding included.
    pub ids: Vec<i64>,
    /// Whether the prompt had more tokens than fit and was cut.
    pub truncated: bool,
}

/// What fills a CLIP sequence after its end token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// The end-of-text id (HF `CLIPTokenizer`, FLUX's text encoder).
    EndOfText,
    /// Id 0 (open_clip's `tokenize`, the reward model).
    Zero,
}

/// Stacks encodings of equal length into an int64 tensor `[n, len]`.
///
/// Fails when the encodings have different lengths or there are none.
pub fn batch_ids(encodings: &[Encoding]) -> Result<Tensor> {
    let len = encodings
        .first()
        .ok_or_else(|| Error::Input("batch_ids: no encodings".into()))?
        .ids
        .len();
    if let Some(bad) = encodings.iter().position(|e| e.ids.len() != len) {
        return Err(Error::Input(format!(
            "batch_ids: encoding {bad} has {} ids, encoding 0 has {len}",
            encodings[bad].ids.len()
        )));
    }
    let flat: Vec<i64> = encodings
        .iter()
        .flat_map(|e| e.ids.iter().copied())
        .collect();
    Ok(Tensor::from_slice(&flat).view([encodings.len() as i64, len as i64]))
}

/// Builds `[prefix..., body (cut to fit)..., suffix..., pad...]` of exactly `len` ids.
///
/// `body` is truncated so that the prefix and suffix always fit; fails when they
/// alone do not fit in `len`.
pub(crate) fn assemble(
    prefix: &[i64],
    body: &[i64],
    suffix: &[i64],
    len: usize,
    pad: i64,
) -> Result<Encoding> {
    let fixed = prefix.len() + suffix.len();
    if len < fixed {
        return Err(Error::Input(format!(
            "sequence length {len} is shorter than the {fixed} special tokens it must hold"
        )));
    }
    let room = len - fixed;
    let truncated = body.len() > room;
    let mut ids = Vec::with_capacity(len);
    ids.extend_from_slice(prefix);
    ids.extend_from_slice(&body[..body.len().min(room)]);
    ids.extend_from_slice(suffix);
    ids.resize(len, pad);
    Ok(Encoding { ids, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_truncates_and_pads() {
        let e = assemble(&[9], &[1, 2, 3], &[8], 4, 0).unwrap();
        assert_eq!(e.ids, vec![9, 1, 2, 8]);
        assert!(e.truncated);
        let e = assemble(&[9], &[1], &[8], 5, 7).unwrap();
        assert_eq!(e.ids, vec![9, 1, 8, 7, 7]);
        assert!(!e.truncated);
        assert!(assemble(&[9], &[], &[8], 1, 0).is_err());
    }

    #[test]
    fn batch_ids_stacks_rows_and_rejects_ragged() {
        let a = Encoding {
            ids: vec![1, 2, 3],
            truncated: false,
        };
        let b = Encoding {
            ids: vec![4, 5, 6],
            truncated: true,
        };
        let t = batch_ids(&[a.clone(), b]).unwrap();
        assert_eq!(t.size(), vec![2, 3]);
        assert_eq!(Vec::<i64>::try_from(&t.get(1)).unwrap(), vec![4, 5, 6]);
        let short = Encoding {
            ids: vec![1],
            truncated: false,
        };
        assert!(batch_ids(&[a, short]).is_err());
        assert!(batch_ids(&[]).is_err());
    }
}
