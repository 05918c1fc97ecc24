//! T5 Unigram tokenizer (HF `T5TokenizerFast` semantics): added tokens, normalizer,
//! Metaspace pre-tokenizer, Viterbi segmentation, `</s>` appended, padding.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::added::{self, AddedTokens, Segment};
use super::config::Field;
use super::normalize::Normalizer;
use super::spiece;
use super::{assemble, Encoding};
use crate::error::{Error, Result};
use crate::io::json::read_json;

/// Score penalty of an unknown character below the lowest piece score (HF and
/// sentencepiece's `kUnkPenalty`).
const UNK_PENALTY: f64 = 10.0;

/// Where the Metaspace pre-tokenizer puts a leading `▁`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrependScheme {
    /// Before every text segment that does not start with one.
    Always,
    /// Only before the first segment of the input.
    First,
    /// Never.
    Never,
}

/// What a piece that is not in the vocab becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteFallback {
    /// `<0xNN>` pieces per UTF-8 byte when all exist, else the unknown id.
    Bytes,
    /// The unknown id.
    Unknown,
}

/// A T5 sentencepiece-Unigram tokenizer: `[pieces..., </s>, <pad>...]`.
pub struct T5Tokenizer {
    scores: Vec<f64>,
    ids: HashMap<String, u32>,
    /// Longest piece in bytes (bounds the Viterbi prefix search).
    max_piece_len: usize,
    unk_id: Option<u32>,
    unk_score: f64,
    byte_fallback: ByteFallback,
    normalizer: Normalizer,
    added: AddedTokens,
    replacement: char,
    prepend: PrependScheme,
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

    /// Loads a HF `tokenizers` file with a Unigram model and Metaspace pre-tokenizer.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let root_value: Value = read_json(path)?;
        let root = Field::root(path, &root_value);
        let model = root.get("model", "model")?;
        let kind = model.get("type", "model.type")?.str()?;
        if kind != "Unigram" {
            return Err(Error::config(
                path,
                "model.type",
                format!("expected Unigram, found {kind}"),
            ));
        }
        let pieces = parse_pieces(model.get("vocab", "model.vocab")?)?;
        let unk_id = match model.opt("unk_id", "model.unk_id") {
            Some(f) => match f.u64()? {
                u if (u as usize) < pieces.len() => Some(u as u32),
                u => return Err(f.error(format!("{u} is outside the vocab of {}", pieces.len()))),
            },
            None => None,
        };
        let fallback = model.opt("byte_fallback", "model.byte_fallback");
        let byte_fallback = match fallback.map(|f| f.bool()).transpose()? {
            Some(true) => ByteFallback::Bytes,
            _ => ByteFallback::Unknown,
        };
        let normalizer = match root.opt("normalizer", "normalizer") {
            Some(f) => Normalizer::parse(f)?,
            None => Normalizer::identity(),
        };
        let added = match root.opt("added_tokens", "added_tokens") {
            Some(f) => AddedTokens::parse(f, &normalizer)?,
            None => AddedTokens::default(),
        };
        let (replacement, prepend) = parse_metaspace(root.get("pre_tokenizer", "pre_tokenizer")?)?;
        let mut tok = Self::build(pieces, unk_id, byte_fallback, normalizer, added)?;
        (tok.replacement, tok.prepend) = (replacement, prepend);
        tok.eos = parse_eos(root.get("post_processor", "post_processor")?)?;
        if let Some(p) = root.opt("padding", "padding") {
            tok.pad = p.get("pad_id", "padding.pad_id")?.u64()? as i64;
            let fixed = p.get("strategy", "padding.strategy")?;
            if let Some(n) = fixed.opt("Fixed", "padding.strategy.Fixed") {
                tok.max_len = n.u64()? as usize;
            }
        }
        Ok(tok)
    }

    /// Loads a sentencepiece `spiece.model` as transformers converts it: pieces and
    /// scores, the UNKNOWN piece as unk, control pieces as added tokens, NFKC and
    /// space collapsing, Metaspace (always), `</s>` appended, `<pad>` padding.
    ///
    /// Differs from transformers' conversion in that the model's precompiled
    /// normalization map is replaced by NFKC and no `<extra_id_*>` tokens are added.
    pub fn from_spiece(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let model =
            spiece::parse_model(&bytes).map_err(|msg| Error::config(path, "ModelProto", msg))?;
        let find = |name: &str| model.pieces.iter().position(|p| p.piece == name);
        let unk_id = model
            .pieces
            .iter()
            .position(|p| p.kind == spiece::PieceType::Unknown);
        let mut added = AddedTokens::default();
        for (i, p) in model.pieces.iter().enumerate() {
            if matches!(
                p.kind,
                spiece::PieceType::Control | spiece::PieceType::Unknown
            ) {
                added.raw.push((p.piece.clone(), i as i64));
            }
        }
        let spaces = regex::Regex::new(" {2,}").expect("static regex");
        let normalizer = Normalizer::Sequence(vec![
            Normalizer::Nfkc,
            Normalizer::Replace {
                pattern: spaces,
                content: " ".into(),
            },
        ]);
        let byte_fallback = match model.byte_fallback {
            true => ByteFallback::Bytes,
            false => ByteFallback::Unknown,
        };
        let pieces: Vec<(String, f64)> = model
            .pieces
            .iter()
            .map(|p| (p.piece.clone(), f64::from(p.score)))
            .collect();
        let mut tok = Self::build(
            pieces,
            unk_id.map(|u| u as u32),
            byte_fallback,
            normalizer,
            added,
        )?;
        tok.eos =
            find("</s>").ok_or_else(|| Error::config(path, "pieces", "no `</s>` piece"))? as i64;
        tok.pad =
            find("<pad>").ok_or_else(|| Error::config(path, "pieces", "no `<pad>` piece"))? as i64;
        Ok(tok)
    }

    fn build(
        pieces: Vec<(String, f64)>,
        unk_id: Option<u32>,
        byte_fallback: ByteFallback,
        normalizer: Normalizer,
        added: AddedTokens,
    ) -> Result<Self> {
        let min_score = pieces.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let max_piece_len = pieces.iter().map(|p| p.0.len()).max().unwrap_or(0);
        // HF builds its map with later duplicates winning.
        let ids = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.0.clone(), i as u32))
            .collect();
        Ok(T5Tokenizer {
            scores: pieces.into_iter().map(|p| p.1).collect(),
            ids,
            max_piece_len,
            unk_id,
            unk_score: min_score - UNK_PENALTY,
            byte_fallback,
            normalizer,
            added,
            replacement: '▁',
            prepend: PrependScheme::Always,
            eos: 1,
            pad: 0,
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
        let mut ids = Vec::new();
        // Whether the next text piece starts the input (for `PrependScheme::First`).
        let mut first = true;
        for seg in added::split(text, &self.added.raw) {
            match seg {
                Segment::Token(id) => ids.push(id),
                Segment::Text(raw) => {
                    let norm = self.normalizer.apply(raw);
                    for seg in added::split(&norm, &self.added.normalized) {
                        match seg {
                            Segment::Token(id) => ids.push(id),
                            Segment::Text(t) => self.metaspace(t, first, &mut ids)?,
                        }
                        first = false;
                    }
                }
            }
            first = false;
        }
        Ok(ids)
    }

    /// Metaspace: spaces become `▁`, a `▁` is prepended per the scheme, and the
    /// text is split before every `▁`; each word is segmented.
    fn metaspace(&self, text: &str, first: bool, ids: &mut Vec<i64>) -> Result<()> {
        let mut s: String = text.replace(' ', &self.replacement.to_string());
        let prepend = match self.prepend {
            PrependScheme::Always => true,
            PrependScheme::First => first,
            PrependScheme::Never => false,
        };
        if prepend && !s.starts_with(self.replacement) {
            s.insert(0, self.replacement);
        }
        let mut start = 0;
        for (i, _) in s.match_indices(self.replacement) {
            if i > start {
                self.unigram(&s[start..i], ids)?;
            }
            start = i;
        }
        if start < s.len() {
            self.unigram(&s[start..], ids)?;
        }
        Ok(())
    }

    /// Viterbi segmentation of one word over piece scores (HF's `encode_optimized`):
    /// ties keep the earlier candidate; a character no piece starts with costs
    /// `min_score - 10`; consecutive unknown characters fuse into one unknown.
    fn unigram(&self, word: &str, ids: &mut Vec<i64>) -> Result<()> {
        let n = word.len();
        // best[end] = (score, start, id); `None` start = unreached.
        let mut best: Vec<(f64, Option<usize>, Option<u32>)> = vec![(0.0, None, None); n + 1];
        let mut pos = 0;
        while pos < n {
            let here = best[pos].0;
            let ch_len = word[pos..].chars().next().map_or(1, char::len_utf8);
            let mut single = false;
            for (off, c) in word[pos..].char_indices() {
                let end = pos + off + c.len_utf8();
                if end - pos > self.max_piece_len {
                    break;
                }
                if let Some(&id) = self.ids.get(&word[pos..end]) {
                    let cand = here + self.scores[id as usize];
                    if best[end].1.is_none() || cand > best[end].0 {
                        best[end] = (cand, Some(pos), Some(id));
                    }
                    single |= end - pos == ch_len;
                }
            }
            if !single {
                let end = pos + ch_len;
                let cand = here + self.unk_score;
                if best[end].1.is_none() || cand > best[end].0 {
                    best[end] = (cand, Some(pos), None);
                }
            }
            pos += ch_len;
        }
        // Backtrack, fusing runs of unknowns.
        let mut spans: Vec<(usize, usize, Option<u32>)> = Vec::new();
        let mut end = n;
        while end > 0 {
            let (_, start, id) = best[end];
            let start = start.expect("every character boundary is reached");
            match spans.last_mut() {
                Some(last) if self.is_unk(id) && self.is_unk(last.2) => last.0 = start,
                _ => spans.push((start, end, id)),
            }
            end = start;
        }
        for &(s, e, id) in spans.iter().rev() {
            match id {
                Some(id) if !self.is_unk(Some(id)) => ids.push(id as i64),
                _ => self.unknown(&word[s..e], ids)?,
            }
        }
        Ok(())
    }

    /// Whether a lattice node is unknown (an unmatched character or the unk piece).
    fn is_unk(&self, id: Option<u32>) -> bool {
        id.is_none() || id == self.unk_id
    }

    /// A fused run of unknown characters: its own piece if it is one (possible
    /// only after fusing), else byte pieces or the unknown id.
    fn unknown(&self, text: &str, ids: &mut Vec<i64>) -> Result<()> {
        if let Some(&id) = self.ids.get(text) {
            ids.push(id as i64);
            return Ok(());
        }
        if self.byte_fallback == ByteFallback::Bytes {
            let bytes: Option<Vec<i64>> = text
                .bytes()
                .map(|b| self.ids.get(&format!("<0x{b:02X}>")).map(|&i| i as i64))
                .collect();
            if let Some(bytes) = bytes {
                ids.extend(bytes);
                return Ok(());
            }
        }
        let unk = self.unk_id.ok_or_else(|| {
            Error::Input(format!(
                "T5 tokenizer: `{text}` is not in the vocab and there is no unk id"
            ))
        })?;
        ids.push(unk as i64);
        Ok(())
    }
}

/// `[[piece, score], ...]`.
fn parse_pieces(field: Field<'_>) -> Result<Vec<(String, f64)>> {
    field
        .array()?
        .iter()
        .enumerate()
        .map(|(i, v)| match (v[0].as_str(), v[1].as_f64()) {
            (Some(p), Some(s)) => Ok((p.to_string(), s)),
            _ => Err(field.error(format!("entry {i} ({v}) is not [piece, score]"))),
        })
        .collect()
}

/// A `Metaspace` pre-tokenizer with `split: true`.
fn parse_metaspace(field: Field<'_>) -> Result<(char, PrependScheme)> {
    let kind = field.get("type", "pre_tokenizer.type")?.str()?;
    if kind != "Metaspace" {
        return Err(field.error(format!("expected Metaspace, found {kind}")));
    }
    let rep = field.get("replacement", "pre_tokenizer.replacement")?;
    let mut chars = rep.str()?.chars();
    let (Some(replacement), None) = (chars.next(), chars.next()) else {
        return Err(rep.error("expected one character"));
    };
    if let Some(split) = field.opt("split", "pre_tokenizer.split") {
        if !split.bool()? {
            return Err(split.error("only split = true is supported"));
        }
    }
    let scheme = match field.opt("prepend_scheme", "pre_tokenizer.prepend_scheme") {
        Some(f) => match f.str()? {
            "always" => PrependScheme::Always,
            "first" => PrependScheme::First,
            "never" => PrependScheme::Never,
            other => return Err(f.error(format!("unknown prepend scheme `{other}`"))),
        },
        None => match field.opt("add_prefix_space", "pre_tokenizer.add_prefix_space") {
            Some(f) if !f.bool()? => PrependScheme::Never,
            _ => PrependScheme::Always,
        },
    };
    Ok((replacement, scheme))
}

/// The id a `TemplateProcessing` appends after the sequence (`$A </s>`).
fn parse_eos(field: Field<'_>) -> Result<i64> {
    let bad = || field.error("expected TemplateProcessing with single = [$A, </s>]");
    if field.get("type", "post_processor.type")?.str()? != "TemplateProcessing" {
        return Err(bad());
    }
    let single = field.get("single", "post_processor.single")?.array()?;
    let [a, special] = single.as_slice() else {
        return Err(bad());
    };
    let name = special["SpecialToken"]["id"].as_str();
    if a["Sequence"]["id"] != "A" || name.is_none() {
        return Err(bad());
    }
    let tokens = field.get("special_tokens", "post_processor.special_tokens")?;
    let ids = &tokens.value[name.unwrap_or_default()]["ids"];
    match ids.as_array().map(Vec::as_slice) {
        Some([id]) => id.as_i64().ok_or_else(bad),
        _ => Err(bad()),
    }
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
    fn viterbi_prefers_the_best_total_score() {
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
