//! The subset of HF `tokenizers` normalizers the CLIP and T5 tokenizer files use.

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::config::Field;
use crate::error::Result;

/// One normalization step of a `tokenizer.json` `normalizer`.
#[derive(Debug, Clone)]
pub(crate) enum Normalizer {
    /// Unicode NFC.
    Nfc,
    /// Unicode NFKC.
    Nfkc,
    /// Unicode NFD.
    Nfd,
    /// Unicode NFKD.
    Nfkd,
    /// Per-character lowercase (`char::to_lowercase`, no final-sigma context, as HF).
    Lowercase,
    /// Replaces every match of a pattern by `content`.
    Replace {
        /// The pattern (a literal is escaped into a regex).
        pattern: Regex,
        /// The replacement text (inserted literally).
        content: String,
    },
    /// Removes leading and/or trailing whitespace.
    Strip {
        /// Strip on the left.
        left: Side,
        /// Strip on the right.
        right: Side,
    },
    /// Steps applied in order.
    Sequence(Vec<Normalizer>),
}

/// Whether a [`Normalizer::Strip`] acts on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// Strip this side.
    Strip,
    /// Leave this side.
    Keep,
}

impl Normalizer {
    /// The identity normalizer.
    pub fn identity() -> Self {
        Normalizer::Sequence(Vec::new())
    }

    /// Parses a `normalizer` object (`null` is handled by the caller).
    pub fn parse(field: Field<'_>) -> Result<Self> {
        let kind = field.get("type", "normalizer.type")?.str()?;
        Ok(match kind {
            "NFC" => Normalizer::Nfc,
            "NFKC" => Normalizer::Nfkc,
            "NFD" => Normalizer::Nfd,
            "NFKD" => Normalizer::Nfkd,
            "Lowercase" => Normalizer::Lowercase,
            "Sequence" => {
                let items = field.get("normalizers", "normalizer.normalizers")?;
                let steps = items
                    .array()?
                    .iter()
                    .map(|v| Normalizer::parse(items.item(v)));
                Normalizer::Sequence(steps.collect::<Result<_>>()?)
            }
            "Replace" => Self::parse_replace(field)?,
            "Strip" => {
                let side = |key, name| -> Result<Side> {
                    let on = field.opt(key, name).map(|f| f.bool()).transpose()?;
                    Ok(if on.unwrap_or(true) {
                        Side::Strip
                    } else {
                        Side::Keep
                    })
                };
                Normalizer::Strip {
                    left: side("strip_left", "normalizer.strip_left")?,
                    right: side("strip_right", "normalizer.strip_right")?,
                }
            }
            other => return Err(field.error(format!("unsupported normalizer type `{other}`"))),
        })
    }

    fn parse_replace(field: Field<'_>) -> Result<Self> {
        let pattern = field.get("pattern", "normalizer.pattern")?;
        let content = field
            .get("content", "normalizer.content")?
            .str()?
            .to_string();
        let source = if let Some(re) = pattern.opt("Regex", "normalizer.pattern.Regex") {
            re.str()?.to_string()
        } else if let Some(lit) = pattern.opt("String", "normalizer.pattern.String") {
            regex::escape(lit.str()?)
        } else {
            return Err(pattern.error("expected {\"Regex\": ..} or {\"String\": ..}"));
        };
        let pattern = Regex::new(&source)
            .map_err(|e| field.error(format!("pattern `{source}` does not compile: {e}")))?;
        Ok(Normalizer::Replace { pattern, content })
    }

    /// Applies the normalizer to `text`.
    pub fn apply(&self, text: &str) -> String {
        match self {
            Normalizer::Nfc => text.nfc().collect(),
            Normalizer::Nfkc => text.nfkc().collect(),
            Normalizer::Nfd => text.nfd().collect(),
            Normalizer::Nfkd => text.nfkd().collect(),
            Normalizer::Lowercase => text.chars().flat_map(char::to_lowercase).collect(),
            Normalizer::Replace { pattern, content } => pattern
                .replace_all(text, regex::NoExpand(content))
                .into_owned(),
            Normalizer::Strip { left, right } => {
                let mut s = text;
                if *left == Side::Strip {
                    s = s.trim_start();
                }
                if *right == Side::Strip {
                    s = s.trim_end();
                }
                s.to_string()
            }
            Normalizer::Sequence(steps) => steps
                .iter()
                .fold(text.to_string(), |acc, step| step.apply(&acc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn parse(v: serde_json::Value) -> Result<Normalizer> {
        Normalizer::parse(Field::root(Path::new("t.json"), &v))
    }

    #[test]
    fn clip_normalizer_collapses_whitespace_and_lowercases() {
        let n = parse(json!({"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]}))
        .unwrap();
        assert_eq!(n.apply("  A\t\u{3000}Cafe\u{301}\nΣ "), " a café σ ");
        // HF lowercases per character: no final sigma.
        assert_eq!(n.apply("ΟΔΟΣ"), "οδοσ");
    }

    #[test]
    fn t5_normalizer_only_collapses_runs_of_spaces() {
        let n = parse(json!({"type": "Sequence", "normalizers": [
            {"type": "NFKC"},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}))
        .unwrap();
        assert_eq!(n.apply("a   b\t\tｃ ﬁ"), "a b\t\tc fi");
    }

    #[test]
    fn unsupported_normalizer_is_named() {
        let err = parse(json!({"type": "Precompiled"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.json") && err.contains("Precompiled"),
            "{err}"
        );
    }
}
