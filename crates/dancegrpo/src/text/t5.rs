//! T5 Unigram tokenizer through Hugging Face's `tokenizers` crate, the library
//! the reference's `T5TokenizerFast` runs (Python `tokenizers` binds it), so a
//! `tokenizer.json` segments exactly as there: normalizer, added tokens,
//! Metaspace pre-tokenizer, Unigram (Viterbi, unknown runs fused). A
//! sentencepiece `spiece.model` is converted into the same pipeline.
//!
//! What stays here: `</s>`, truncation and padding to the length the caller
//! asks for, reading `spiece.model` (its protobuf), and errors that name the
//! file and the field.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Replace, Sequence, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, ModelWrapper, Tokenizer};

use super::config::Field;
use super::spiece;
use super::{assemble, Encoding};
use crate::error::{Error, Result};
use crate::io::json::read_json;

/// A T5 tokenizer and the ids it ends and pads with.
pub struct T5Tokenizer {
    tok: Tokenizer,
    eos: i64,
    pad: i64,
    max_len: usize,
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json`, else `dir/spiece.model`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let model = dir.join("spiece.model");
        if json.is_file() {
            Self::from_tokenizer_json(&json)
        } else if model.is_file() {
            Self::from_spiece(&model)
        } else {
            let msg = "no T5 tokenizer (tokenizer.json or spiece.model)";
            Err(Error::not_found(json, msg))
        }
    }

    /// Loads a HF `tokenizers` file with a Unigram model.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let value: Value = read_json(path)?;
        check_unigram_json(path, &value)?;
        let mut tok: Tokenizer = serde_json::from_value(value)
            .map_err(|e| Error::config(path, "tokenizer.json", e.to_string()))?;
        let max_len = match tok.get_padding().map(|p| &p.strategy) {
            Some(tokenizers::PaddingStrategy::Fixed(n)) => *n,
            _ => 512,
        };
        let pad = tok.get_padding().map_or(0, |p| p.pad_id as i64);
        let eos = (tok.token_to_id("</s>"))
            .ok_or_else(|| Error::config(path, "post_processor", "no `</s>` token"))?;
        // the caller's length rules: no truncation or padding of the file's own
        tok.with_truncation(None)
            .map_err(|e| Error::config(path, "truncation", e.to_string()))?;
        tok.with_padding(None);
        Ok(T5Tokenizer {
            tok,
            eos: eos as i64,
            pad,
            max_len,
        })
    }

    /// Loads a sentencepiece `spiece.model` as transformers converts it: pieces and
    /// scores, the UNKNOWN piece as unk, control pieces as special tokens, NFKC and
    /// space collapsing, Metaspace (always), `</s>` appended, `<pad>` padding.
    ///
    /// Differs from transformers' conversion in that the model's precompiled
    /// normalization map is replaced by NFKC and no `<extra_id_*>` tokens are added.
    pub fn from_spiece(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model =
            spiece::parse_model(&bytes).map_err(|msg| Error::config(path, "ModelProto", msg))?;
        let bad = |msg: String| Error::config(path, "pieces", msg);
        let find = |name: &str| model.pieces.iter().position(|p| p.piece == name);
        let unk_id = (model.pieces.iter()).position(|p| p.kind == spiece::PieceType::Unknown);
        let pieces: Vec<(String, f64)> = (model.pieces.iter())
            .map(|p| (p.piece.clone(), f64::from(p.score)))
            .collect();
        let unigram =
            Unigram::from(pieces, unk_id, model.byte_fallback).map_err(|e| bad(e.to_string()))?;
        let mut tok = Tokenizer::new(ModelWrapper::Unigram(unigram));
        let spaces = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
            " ",
        )
        .map_err(|e| bad(e.to_string()))?;
        tok.with_normalizer(Some(Sequence::new(vec![NFKC.into(), spaces.into()])));
        tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
        let specials: Vec<AddedToken> = (model.pieces.iter())
            .filter(|p| {
                matches!(
                    p.kind,
                    spiece::PieceType::Control | spiece::PieceType::Unknown
                )
            })
            .map(|p| AddedToken::from(p.piece.clone(), true))
            .collect();
        tok.add_special_tokens(&specials);
        let eos = find("</s>").ok_or_else(|| bad("no `</s>` piece".into()))? as i64;
        let pad = find("<pad>").ok_or_else(|| bad("no `<pad>` piece".into()))? as i64;
        Ok(T5Tokenizer {
            tok,
            eos,
            pad,
            max_len: 512,
        })
    }

    /// The sequence length the tokenizer file pads to.
    pub fn max_length(&self) -> usize {
        self.max_len
    }

    /// The end (`</s>`) and padding (`<pad>`) ids.
    pub fn special_ids(&self) -> (i64, i64) {
        (self.eos, self.pad)
    }

    /// Encodes `text` into exactly `max_len` ids: at most `max_len - 1` pieces,
    /// `</s>`, padding. Fails if a character is unknown and there is no unk id.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Encoding> {
        let body = self.tokenize(text)?;
        assemble(&[], &body, &[self.eos], max_len, self.pad)
    }

    /// The piece ids of `text` without `</s>`, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>> {
        let enc = (self.tok.encode(text, false))
            .map_err(|e| Error::Input(format!("T5 tokenizer: {text:?}: {e}")))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }
}

/// The structure `tokenizers` needs of a T5 file, checked first so that an
/// error names the field and entry (the crate's own error names neither: serde
/// loses the path inside its tagged model).
fn check_unigram_json(path: &Path, value: &Value) -> Result<()> {
    let root = Field::root(path, value);
    let model = root.model("Unigram")?;
    let vocab = model.get("vocab", "model.vocab")?.array()?;
    if let Some(f) = model.opt("unk_id", "model.unk_id") {
        match f.u64()? {
            u if (u as usize) < vocab.len() => {}
            u => return Err(f.error(format!("{u} is outside the vocab of {}", vocab.len()))),
        }
    }
    for (i, entry) in vocab.iter().enumerate() {
        let ok = entry.as_array().is_some_and(|e| {
            e.len() == 2 && e[0].is_string() && e[1].as_f64().is_some_and(f64::is_finite)
        });
        if !ok {
            return Err(Error::config(
                path,
                "model.vocab",
                format!("entry {i} is {entry}, not [piece, finite score]"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture_json() -> PathBuf {
        let root = std::env::var_os("DANCEGRPO_FIXTURES").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
            PathBuf::from,
        );
        root.join("public/flux_tiny_a/text_encoders/tokenizer_2/tokenizer.json")
    }

    /// A tokenizer from in-memory pieces (unk id 0), as a spiece model.
    fn from_pieces(pieces: &[(&str, f32, u64)], name: &str) -> T5Tokenizer {
        let dir = std::env::temp_dir().join(format!("dancegrpo-t5-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spiece.model");
        std::fs::write(&path, spiece::encode_model(pieces)).unwrap();
        T5Tokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn pieces_from_a_spiece_model_segment_by_score() {
        let pieces = [
            ("<unk>", 0.0, 2),
            ("</s>", 0.0, 3),
            ("<pad>", 0.0, 3),
            ("▁", -3.0, 1),
            ("▁ab", -5.0, 1),
            ("▁a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -1.0, 1),
        ];
        let tok = from_pieces(&pieces, "viterbi");
        // "▁a" + "b" = -2 beats "▁ab" = -5.
        assert_eq!(tok.tokenize("ab").unwrap(), vec![5, 6]);
        // Unknown "xy" fuses into one unk (id 0); "</s>" in the text is the control id.
        assert_eq!(tok.tokenize("axyc</s>").unwrap(), vec![5, 0, 7, 1]);
        let e = tok.encode("ab ab ab", 4).unwrap();
        assert_eq!((e.ids, e.truncated), (vec![5, 6, 5, 1], true));
        assert_eq!(tok.encode("c", 3).unwrap().ids, vec![3, 7, 1]);
    }

    #[test]
    fn spiece_model_matches_tokenizer_json() {
        let json = T5Tokenizer::from_tokenizer_json(&fixture_json()).unwrap();
        let text = std::fs::read_to_string(fixture_json()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let vocab = v["model"]["vocab"].as_array().unwrap();
        let pieces: Vec<(&str, f32, u64)> = vocab
            .iter()
            .map(|p| {
                let piece = p[0].as_str().unwrap();
                let kind = match piece {
                    "<unk>" => 2,
                    "<pad>" | "</s>" => 3,
                    _ => 1,
                };
                (piece, p[1].as_f64().unwrap() as f32, kind)
            })
            .collect();
        let sp = from_pieces(&pieces, "fixture");
        assert_eq!(sp.special_ids(), (1, 0));
        for text in [
            "a photo of a red fox sitting in the snow",
            "  Ünïcode 狐狸 </s> x  y",
            "",
        ] {
            assert_eq!(
                sp.encode(text, 32).unwrap(),
                json.encode(text, 32).unwrap(),
                "{text:?}"
            );
        }
    }
}
