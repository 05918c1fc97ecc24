//! CLIP byte-level BPE tokenizer (HF `CLIPTokenizer(Fast)` and open_clip's
//! `SimpleTokenizer`).
//!
//! Hand-written, unlike T5's: the reference's CLIP tokenizers are Python, not
//! the `tokenizers` library (FLUX's slow `CLIPTokenizer` cleans with ftfy, which
//! open_clip installs, then collapses whitespace and lowercases; HPSv2's
//! open_clip `SimpleTokenizer` also unescapes HTML), and that library's CLIP
//! pipeline does neither. ftfy itself is reproduced in `clean` and `mojibake`.
//!
//! Which Python tokenizer a directory stands for depends on who loads it:
//! diffusers' FLUX pipeline loads the slow `CLIPTokenizer` from `vocab.json` +
//! `merges.txt` ([`TextHandling::SlowFtfy`]); `CLIPProcessor` and `AutoTokenizer`
//! (CLIP score, PickScore) load `CLIPTokenizerFast`, from `tokenizer.json` or
//! converted from the same two files ([`TextHandling::Fast`]).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::added::{self, AddedTokens, Segment};
use super::clean::{Cleaning, TextCleaner};
use super::clip_files::{
    check_bpe_options, merges_from_lines, parse_merges, parse_padding, parse_post_processor,
    parse_pre_tokenizer, parse_vocab, SUFFIX,
};
use super::config::Field;
use super::normalize::Normalizer;
use super::{assemble, Encoding, Padding};
use crate::error::{Error, Result};
use crate::io::json::read_json;

/// open_clip's pre-tokenization pattern (special tokens first, case-insensitive
/// where Python's `re.IGNORECASE` can matter on lowercased text).
const OPEN_CLIP_PATTERN: &str =
    r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
/// HF CLIP's pre-tokenization pattern (used for `vocab.json` + `merges.txt`).
const HF_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The slow `CLIPTokenizer`'s pattern (`re.IGNORECASE`, applied to lowercased text).
const SLOW_PATTERN: &str =
    r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

/// GPT-2's reversible byte -> printable character map, in its construction order
/// (printable bytes first, then the others mapped to U+0100..).
pub(crate) fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    let mut map: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    map.extend(
        others
            .zip(256u32..)
            .map(|(b, c)| (b, char::from_u32(c).expect("valid"))),
    );
    map
}

/// Which Python tokenizer's text handling a `vocab.json` + `merges.txt` pair gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextHandling {
    /// `CLIPTokenizerFast` (`CLIPProcessor`, `AutoTokenizer`): NFC, whitespace
    /// collapse, lowercase; a `tokenizer.json` is preferred when present.
    Fast,
    /// transformers' slow `CLIPTokenizer` with ftfy installed (diffusers' FLUX
    /// pipeline): `ftfy.fix_text`, whitespace collapse, lowercase; `vocab.json` +
    /// `merges.txt` are preferred when present.
    SlowFtfy,
}

/// How the text is prepared before BPE.
enum Frontend {
    /// HF `tokenizers`: added tokens, normalizer, regex split.
    Hf {
        normalizer: Normalizer,
        added: AddedTokens,
        split: Regex,
    },
    /// The Python tokenizers: ftfy cleaning, one regex with the special tokens in it.
    Python {
        cleaner: Box<TextCleaner>,
        pattern: Regex,
        specials: HashMap<String, i64>,
    },
}

/// A CLIP BPE tokenizer: `[start, bpe..., end, pad...]`.
pub struct ClipTokenizer {
    /// Id of each byte as a word-inner symbol and as a word-final (`</w>`) symbol.
    byte_ids: [[Option<u32>; 256]; 2],
    /// Merge table: symbol pair -> (rank, merged symbol).
    merges: HashMap<(u32, u32), (u32, u32)>,
    unk: Option<u32>,
    start: i64,
    end: i64,
    frontend: Frontend,
    context: usize,
    padding: Padding,
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`, else `dir/vocab.json` + `dir/merges.txt`, else
    /// `dir/bpe_simple_vocab_16e6.txt.gz`, as `CLIPTokenizerFast` or open_clip.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_as(dir, TextHandling::Fast)
    }

    /// [`Self::from_dir`] for the given Python tokenizer: with
    /// [`TextHandling::SlowFtfy`] a `vocab.json` + `merges.txt` pair comes first.
    pub fn from_dir_as(dir: &Path, handling: TextHandling) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let gz = dir.join("bpe_simple_vocab_16e6.txt.gz");
        let pair = vocab.is_file() && merges.is_file();
        if json.is_file() && !(pair && handling == TextHandling::SlowFtfy) {
            Self::from_tokenizer_json(&json)
        } else if pair {
            Self::from_vocab_merges(&vocab, &merges, handling)
        } else if gz.is_file() {
            Self::from_open_clip_bpe(&gz)
        } else {
            Err(Error::not_found(json, "no CLIP tokenizer (tokenizer.json, vocab.json + merges.txt or bpe_simple_vocab_16e6.txt.gz)"))
        }
    }

    /// Loads a HF `tokenizers` file (BPE model, CLIP pre-tokenizer, Roberta
    /// post-processor); its fixed padding and truncation become the defaults.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let root_value: Value = read_json(path)?;
        let root = Field::root(path, &root_value);
        let model = root.model("BPE")?;
        check_bpe_options(model)?;
        let vocab = parse_vocab(model.get("vocab", "model.vocab")?)?;
        let merges = parse_merges(model.get("merges", "model.merges")?)?;
        let unk = match model.opt("unk_token", "model.unk_token") {
            Some(f) => Some(
                *vocab
                    .get(f.str()?)
                    .ok_or_else(|| f.error("not in the vocab"))?,
            ),
            None => None,
        };
        let normalizer = match root.opt("normalizer", "normalizer") {
            Some(f) => Normalizer::parse(f)?,
            None => Normalizer::identity(),
        };
        let added = match root.opt("added_tokens", "added_tokens") {
            Some(f) => AddedTokens::parse(f, &normalizer)?,
            None => AddedTokens::default(),
        };
        let split = parse_pre_tokenizer(root.get("pre_tokenizer", "pre_tokenizer")?)?;
        let (start, end) = parse_post_processor(root.get("post_processor", "post_processor")?)?;
        let (context, padding) = parse_padding(root, end)?;
        let frontend = Frontend::Hf {
            normalizer,
            added,
            split,
        };
        let mut tok = Self::build(&vocab, &merges, path, frontend, (start, end))?;
        tok.unk = unk;
        tok.context = context;
        tok.padding = padding;
        Ok(tok)
    }

    /// Loads HF's slow-tokenizer files: `vocab.json` (token -> id) and `merges.txt`
    /// (a `#version` header, then the first 48894 merges are used), with the text
    /// handling of the Python tokenizer that `handling` names.
    pub fn from_vocab_merges(
        vocab_path: &Path,
        merges_path: &Path,
        handling: TextHandling,
    ) -> Result<Self> {
        let vocab_value: Value = read_json(vocab_path)?;
        let vocab = parse_vocab(Field::root(vocab_path, &vocab_value))?;
        let text = std::fs::read_to_string(merges_path).map_err(|e| Error::io(merges_path, e))?;
        let merges = merges_from_lines(&text, merges_path)?;
        let id = |t: &str| {
            vocab
                .get(t)
                .map(|&i| i as i64)
                .ok_or_else(|| Error::config(vocab_path, t, "special token missing from the vocab"))
        };
        let (start, end) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        let frontend = match handling {
            TextHandling::Fast => fast_frontend(start, end),
            TextHandling::SlowFtfy => Frontend::Python {
                cleaner: Box::new(TextCleaner::new(Cleaning::SlowClipTokenizer)),
                pattern: Regex::new(SLOW_PATTERN).expect("static regex"),
                specials: HashMap::from([
                    ("<|startoftext|>".to_string(), start),
                    ("<|endoftext|>".to_string(), end),
                ]),
            },
        };
        let mut tok = Self::build(&vocab, &merges, merges_path, frontend, (start, end))?;
        tok.unk = Some(end as u32);
        Ok(tok)
    }

    /// Loads open_clip's gzipped merges file and builds its vocab: the 256 byte
    /// characters, the same with `</w>`, the 48894 merges joined, then
    /// `<start_of_text>` and `<end_of_text>`. Encoding cleans text as open_clip
    /// (see the module `clean`) and pads with zeros.
    pub fn from_open_clip_bpe(gz: &Path) -> Result<Self> {
        let file = std::fs::File::open(gz).map_err(|e| Error::io(gz, e))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(|e| Error::io(gz, e))?;
        let merges = merges_from_lines(&text, gz)?;
        let bytes: Vec<String> = bytes_to_unicode()
            .iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let mut tokens: Vec<String> = bytes.clone();
        tokens.extend(bytes.iter().map(|b| format!("{b}{SUFFIX}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend(["<start_of_text>".to_string(), "<end_of_text>".to_string()]);
        // Python's dict(zip(vocab, range)): a repeated token keeps its last index.
        let vocab: HashMap<String, u32> = tokens.into_iter().zip(0u32..).collect();
        let start = vocab["<start_of_text>"] as i64;
        let end = vocab["<end_of_text>"] as i64;
        let specials = HashMap::from([
            ("<start_of_text>".to_string(), start),
            ("<end_of_text>".to_string(), end),
        ]);
        let frontend = Frontend::Python {
            cleaner: Box::new(TextCleaner::new(Cleaning::OpenClip)),
            pattern: Regex::new(OPEN_CLIP_PATTERN).expect("static regex"),
            specials,
        };
        let mut tok = Self::build(&vocab, &merges, gz, frontend, (start, end))?;
        tok.padding = Padding::Zero;
        Ok(tok)
    }

    /// Assembles the tables from a vocab and ranked merges (`path` names errors).
    fn build(
        vocab: &HashMap<String, u32>,
        merges: &[(String, String)],
        path: &Path,
        frontend: Frontend,
        (start, end): (i64, i64),
    ) -> Result<Self> {
        let mut byte_ids = [[None; 256]; 2];
        for (b, c) in bytes_to_unicode() {
            byte_ids[0][b as usize] = vocab.get(c.to_string().as_str()).copied();
            byte_ids[1][b as usize] = vocab.get(format!("{c}{SUFFIX}").as_str()).copied();
        }
        let mut table = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    Error::config(
                        path,
                        "merges",
                        format!("merge `{a} {b}`: `{t}` is not in the vocab"),
                    )
                })
            };
            let merged = id(&format!("{a}{b}"))?;
            table.insert((id(a)?, id(b)?), (rank as u32, merged));
        }
        Ok(ClipTokenizer {
            byte_ids,
            merges: table,
            unk: None,
            start,
            end,
            frontend,
            context: 77,
            padding: Padding::EndOfText,
        })
    }

    /// The sequence length the tokenizer file asks for (77 for CLIP).
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// The padding the tokenizer file asks for.
    pub fn padding(&self) -> Padding {
        self.padding
    }

    /// The start-of-text and end-of-text ids.
    pub fn special_ids(&self) -> (i64, i64) {
        (self.start, self.end)
    }

    /// Encodes with the file's own context length and padding.
    pub fn encode_default(&self, text: &str) -> Result<Encoding> {
        self.encode(text, self.context, self.padding)
    }

    /// Encodes `text` into exactly `context` ids: start, at most `context - 2` BPE
    /// tokens, end, padding.
    pub fn encode(&self, text: &str, context: usize, padding: Padding) -> Result<Encoding> {
        let body = self.tokenize(text);
        let pad = match padding {
            Padding::EndOfText => self.end,
            Padding::Zero => 0,
        };
        assemble(&[self.start], &body, &[self.end], context, pad)
    }

    /// The token ids of `text` without special tokens, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        match &self.frontend {
            Frontend::Hf {
                normalizer,
                added,
                split,
            } => {
                for seg in added::split(text, &added.raw) {
                    match seg {
                        Segment::Token(id) => ids.push(id),
                        Segment::Text(raw) => {
                            let norm = normalizer.apply(raw);
                            for seg in added::split(&norm, &added.normalized) {
                                match seg {
                                    Segment::Token(id) => ids.push(id),
                                    Segment::Text(t) => split
                                        .find_iter(t)
                                        .for_each(|m| self.bpe_word(m.as_str(), &mut ids)),
                                }
                            }
                        }
                    }
                }
            }
            Frontend::Python {
                cleaner,
                pattern,
                specials,
            } => {
                let clean = cleaner.clean(text);
                for m in pattern.find_iter(&clean) {
                    match specials.get(m.as_str()) {
                        Some(&id) => ids.push(id),
                        None => self.bpe_word(m.as_str(), &mut ids),
                    }
                }
            }
        }
        ids
    }

    /// Byte-level BPE of one pre-token: repeatedly merges the lowest-ranked
    /// adjacent pair (leftmost on ties).
    fn bpe_word(&self, word: &str, out: &mut Vec<i64>) {
        let bytes = word.as_bytes();
        let mut syms: Vec<u32> = Vec::with_capacity(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            let last = usize::from(i + 1 == bytes.len());
            if let Some(id) = self.byte_ids[last][b as usize].or(self.unk) {
                syms.push(id);
            }
        }
        while syms.len() > 1 {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend(syms.iter().map(|&s| s as i64));
    }
}

/// `CLIPTokenizerFast` as converted from slow files: NFC, whitespace collapse,
/// lowercase, the special tokens matched in the normalized text.
fn fast_frontend(start: i64, end: i64) -> Frontend {
    let ws = Regex::new(r"\s+").expect("static regex");
    let normalizer = Normalizer::Sequence(vec![
        Normalizer::Nfc,
        Normalizer::Replace {
            pattern: ws,
            content: " ".into(),
        },
        Normalizer::Lowercase,
    ]);
    let added = AddedTokens {
        raw: Vec::new(),
        normalized: vec![
            ("<|startoftext|>".into(), start),
            ("<|endoftext|>".into(), end),
        ],
    };
    let split = Regex::new(HF_PATTERN).expect("static regex");
    Frontend::Hf {
        normalizer,
        added,
        split,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer over the byte symbols plus merges `h e`, `l o</w>`, `he lo</w>`,
    /// `l l`, written as `vocab.json` + `merges.txt`.
    fn tiny() -> ClipTokenizer {
        let dir = std::env::temp_dir().join(format!("dancegrpo-clip-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut tokens: Vec<String> = bytes_to_unicode()
            .iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let words: Vec<String> = tokens.iter().map(|t| format!("{t}</w>")).collect();
        tokens.extend(words);
        for t in [
            "he",
            "lo</w>",
            "helo</w>",
            "ll",
            "<|startoftext|>",
            "<|endoftext|>",
        ] {
            tokens.push(t.to_string());
        }
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), Value::from(i)))
            .collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(vocab).to_string()).unwrap();
        std::fs::write(
            dir.join("merges.txt"),
            "#version: 0.2\nh e\nl o</w>\nhe lo</w>\nl l\n",
        )
        .unwrap();
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn bpe_applies_merges_by_rank() {
        let tok = tiny();
        // 512 = "he", 513 = "lo</w>", 514 = "helo</w>", 515 = "ll"; "a</w>" = 256 + 64.
        assert_eq!(tok.tokenize("HeLo a"), vec![514, 256 + 64]);
        // "hello": h e l l o</w> -> he l l o</w> -> he l lo</w> (rank 1 before "l l").
        assert_eq!(tok.tokenize("hello"), vec![512, 75, 513]);
        let e = tok.encode("helo", 5, Padding::Zero).unwrap();
        assert_eq!(e.ids, vec![516, 514, 517, 0, 0]);
        assert_eq!(tok.special_ids(), (516, 517));
    }

    #[test]
    fn byte_map_is_gpt2s() {
        let map = bytes_to_unicode();
        assert_eq!(map.len(), 256);
        assert_eq!(map[0], (b'!', '!'));
        assert_eq!(map[188], (0, '\u{100}'));
        assert!(map.contains(&(b' ', 'Ġ')));
    }
}
