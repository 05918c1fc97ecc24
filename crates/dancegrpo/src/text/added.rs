//! Added (special) tokens found verbatim in the input text, as HF `tokenizers`'
//! `AddedVocabulary` extracts them before pre-tokenization.

use super::config::Field;
use super::normalize::Normalizer;
use crate::error::Result;

/// A part of the input text: plain text to tokenize, or an added token's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment<'a> {
    /// Text between added tokens (never empty).
    Text(&'a str),
    /// An added token found in the text.
    Token(i64),
}

/// Added tokens of a tokenizer, split by whether they are matched in the raw text
/// (`normalized: false`) or in the normalized text (`normalized: true`).
#[derive(Debug, Clone, Default)]
pub(crate) struct AddedTokens {
    /// Matched in the raw input.
    pub raw: Vec<(String, i64)>,
    /// Matched in the normalized input (content stored normalized).
    pub normalized: Vec<(String, i64)>,
}

impl AddedTokens {
    /// Parses a `tokenizer.json` `added_tokens` array; normalized contents are
    /// normalized with `normalizer`, as HF does when it builds its matcher.
    pub fn parse(field: Field<'_>, normalizer: &Normalizer) -> Result<Self> {
        let mut tokens = AddedTokens::default();
        for v in field.array()? {
            let item = field.item(v);
            let content = item.get("content", "added_tokens.content")?.str()?;
            let id = item.get("id", "added_tokens.id")?.u64()? as i64;
            let normalized = item
                .opt("normalized", "added_tokens.normalized")
                .map(|f| f.bool())
                .transpose()?
                .unwrap_or(false);
            if content.is_empty() {
                return Err(item.error("empty added token"));
            }
            if normalized {
                tokens.normalized.push((normalizer.apply(content), id));
            } else {
                tokens.raw.push((content.to_string(), id));
            }
        }
        Ok(tokens)
    }
}

/// Splits `text` at occurrences of `tokens` (leftmost, then longest match), dropping
/// empty text parts.
pub(crate) fn split<'a>(text: &'a str, tokens: &[(String, i64)]) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    if tokens.is_empty() {
        if !text.is_empty() {
            out.push(Segment::Text(text));
        }
        return out;
    }
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let best = tokens
            .iter()
            .filter(|(t, _)| rest.starts_with(t.as_str()))
            .max_by_key(|(t, _)| t.len());
        match best {
            Some((t, id)) => {
                if i > start {
                    out.push(Segment::Text(&text[start..i]));
                }
                out.push(Segment::Token(*id));
                i += t.len();
                start = i;
            }
            None => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        out.push(Segment::Text(&text[start..]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_finds_leftmost_longest_and_drops_empty_text() {
        let toks = vec![("<a>".to_string(), 1), ("<a><b>".to_string(), 2)];
        assert_eq!(
            split("x<a><b>y<a>", &toks),
            vec![
                Segment::Text("x"),
                Segment::Token(2),
                Segment::Text("y"),
                Segment::Token(1)
            ]
        );
        assert_eq!(split("", &toks), vec![]);
        assert_eq!(split("é", &[]), vec![Segment::Text("é")]);
    }
}
