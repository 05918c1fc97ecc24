//! The files a CLIP tokenizer is read from: a HF `tokenizer.json` (its BPE
//! model, pre-tokenizer, post-processor and padding), and the `merges.txt`-style
//! lines of the slow tokenizer and open_clip.

use std::collections::HashMap;
use std::path::Path;

use regex::Regex;
use serde_json::Value;

use super::config::Field;
use super::Padding;
use crate::error::{Error, Result};

/// Number of merges CLIP uses from a merges file (`49152 - 256 - 2`).
pub(super) const CLIP_MERGES: usize = 49152 - 256 - 2;
/// The end-of-word suffix of CLIP's BPE.
pub(super) const SUFFIX: &str = "</w>";

/// Rejects BPE options this tokenizer does not implement.
pub(super) fn check_bpe_options(model: Field<'_>) -> Result<()> {
    let suffix = model.opt("end_of_word_suffix", "model.end_of_word_suffix");
    if suffix.map(|f| f.str()).transpose()? != Some(SUFFIX) {
        return Err(Error::config(
            model.path,
            "model.end_of_word_suffix",
            "expected \"</w>\"",
        ));
    }
    if let Some(p) = model.opt(
        "continuing_subword_prefix",
        "model.continuing_subword_prefix",
    ) {
        if !p.str()?.is_empty() {
            return Err(p.error("a continuing-subword prefix is not supported"));
        }
    }
    for (key, name) in [
        ("byte_fallback", "model.byte_fallback"),
        ("ignore_merges", "model.ignore_merges"),
    ] {
        if let Some(f) = model.opt(key, name) {
            if f.bool()? {
                return Err(f.error("not supported (expected false)"));
            }
        }
    }
    if model.opt("dropout", "model.dropout").is_some() {
        return Err(Error::config(
            model.path,
            "model.dropout",
            "BPE dropout is not supported",
        ));
    }
    Ok(())
}

/// A `{token: id}` object.
pub(super) fn parse_vocab(field: Field<'_>) -> Result<HashMap<String, u32>> {
    let obj = field
        .value
        .as_object()
        .ok_or_else(|| field.error("expected an object {token: id}"))?;
    obj.iter()
        .map(|(k, v)| {
            let id = v.as_u64().filter(|&i| i <= u32::MAX as u64);
            id.map(|i| (k.clone(), i as u32))
                .ok_or_else(|| field.error(format!("token `{k}`: id {v} is not a u32")))
        })
        .collect()
}

/// `merges` as `"a b"` strings or `["a", "b"]` pairs.
pub(super) fn parse_merges(field: Field<'_>) -> Result<Vec<(String, String)>> {
    field
        .array()?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let pair = match v {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| field.error(format!("entry {i} ({v}) is not a pair")))
        })
        .collect()
}

/// Merges from a text file: skip the header line, take the next 48894 lines (or
/// all, ignoring trailing line breaks), each split on whitespace into two symbols.
pub(super) fn merges_from_lines(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.trim_end_matches(['\n', '\r'])
        .split('\n')
        .skip(1)
        .take(CLIP_MERGES)
        .enumerate()
        .map(|(i, line)| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                [a, b] => Ok((a.to_string(), b.to_string())),
                _ => Err(Error::config(
                    path,
                    &format!("line {}", i + 2),
                    format!("`{line}` is not a merge pair"),
                )),
            }
        })
        .collect()
}

/// The CLIP pre-tokenizer: `Split(regex, Removed, invert)` then `ByteLevel`.
pub(super) fn parse_pre_tokenizer(field: Field<'_>) -> Result<Regex> {
    let unsupported = || field.error("expected Sequence[Split(Regex, Removed, invert), ByteLevel]");
    let kind = field.get("type", "pre_tokenizer.type")?.str()?;
    let steps = field.opt("pretokenizers", "pre_tokenizer.pretokenizers");
    let steps = match (kind, steps) {
        ("Sequence", Some(s)) => s.array()?,
        _ => return Err(unsupported()),
    };
    let [split, byte_level] = steps.as_slice() else {
        return Err(unsupported());
    };
    let ok = split["type"] == "Split"
        && split["behavior"] == "Removed"
        && split["invert"] == true
        && byte_level["type"] == "ByteLevel"
        && byte_level["add_prefix_space"] != true;
    let pattern = split["pattern"]["Regex"]
        .as_str()
        .filter(|_| ok)
        .ok_or_else(unsupported)?;
    Regex::new(pattern)
        .map_err(|e| field.error(format!("split pattern `{pattern}` does not compile: {e}")))
}

/// `RobertaProcessing`/`BertProcessing`: the `cls` (start) and `sep` (end) ids.
pub(super) fn parse_post_processor(field: Field<'_>) -> Result<(i64, i64)> {
    let kind = field.get("type", "post_processor.type")?.str()?;
    if kind != "RobertaProcessing" && kind != "BertProcessing" {
        return Err(field.error(format!("unsupported post-processor `{kind}`")));
    }
    let id = |key: &str, name: &'static str| -> Result<i64> {
        let f = field.get(key, name)?;
        f.value[1]
            .as_i64()
            .ok_or_else(|| f.error("expected [token, id]"))
    };
    Ok((
        id("cls", "post_processor.cls")?,
        id("sep", "post_processor.sep")?,
    ))
}

/// Fixed padding length and pad id (the end id or 0); 77 and end-of-text when the
/// file has no padding.
pub(super) fn parse_padding(root: Field<'_>, end: i64) -> Result<(usize, Padding)> {
    let Some(pad) = root.opt("padding", "padding") else {
        let len = root
            .opt("truncation", "truncation")
            .and_then(|t| t.opt("max_length", "truncation.max_length"));
        return Ok((
            len.map(|f| f.u64()).transpose()?.unwrap_or(77) as usize,
            Padding::EndOfText,
        ));
    };
    let fixed = pad
        .get("strategy", "padding.strategy")?
        .opt("Fixed", "padding.strategy.Fixed")
        .ok_or_else(|| Error::config(root.path, "padding.strategy", "expected {\"Fixed\": n}"))?
        .u64()? as usize;
    let pad_id = pad.get("pad_id", "padding.pad_id")?.u64()? as i64;
    let padding = match pad_id {
        0 => Padding::Zero,
        id if id == end => Padding::EndOfText,
        id => {
            return Err(Error::config(
                root.path,
                "padding.pad_id",
                format!("{id}: expected 0 or the end id {end}"),
            ))
        }
    };
    Ok((fixed, padding))
}
