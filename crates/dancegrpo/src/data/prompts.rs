//! Prompts files: one prompt per line (UTF-8).

use std::path::Path;

use crate::error::{Error, Result};

/// One kept prompt and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLine {
    /// 1-based line number in the file.
    pub line: usize,
    /// The prompt, as written on the line (without the line break).
    pub text: String,
}

/// The prompts of a file, in file order, and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct PromptFile {
    /// Kept prompts.
    pub prompts: Vec<PromptLine>,
    /// Empty or whitespace-only lines skipped.
    pub skipped_empty: u64,
    /// Prompts dropped because they contain CJK ideographs (`skip_cjk`).
    pub skipped_cjk: u64,
}

impl PromptFile {
    /// FNV-1a 64 of the kept prompts, each followed by `\n`.
    pub fn hash(&self) -> String {
        super::format::fnv1a64(
            self.prompts
                .iter()
                .flat_map(|p| [p.text.as_bytes(), b"\n".as_slice()]),
        )
    }
}

/// Whether `text` contains a CJK unified ideograph (U+4E00..=U+9FFF), the
/// reference's `contains_chinese` test.
pub fn contains_cjk(text: &str) -> bool {
    text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c))
}

/// Reads `path`: one prompt per line (`\n` or `\r\n`), empty and
/// whitespace-only lines skipped, and with `skip_cjk` lines containing CJK
/// ideographs dropped. A line that is not UTF-8 is an error naming its number.
pub fn read_prompts(path: &Path, skip_cjk: bool) -> Result<PromptFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = PromptFile::default();
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    if body.is_empty() {
        return Ok(out);
    }
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|e| {
            Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "line {line} is not valid UTF-8 (byte {} of the line)",
                        e.valid_up_to() + 1
                    ),
                ),
            )
        })?;
        if text.trim().is_empty() {
            out.skipped_empty += 1;
        } else if skip_cjk && contains_cjk(text) {
            out.skipped_cjk += 1;
        } else {
            out.prompts.push(PromptLine {
                line,
                text: text.to_string(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_empty_cjk_and_bad_utf8() {
        let dir = std::env::temp_dir().join(format!("dg-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.txt");
        std::fs::write(&p, "a cat\r\n\n   \n一只猫\nカタカナ only\nlast").unwrap();
        let f = read_prompts(&p, false).unwrap();
        assert_eq!(f.prompts.len(), 4);
        assert_eq!(f.skipped_empty, 2);
        let f = read_prompts(&p, true).unwrap();
        let texts: Vec<_> = f.prompts.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["a cat", "カタカナ only", "last"]);
        assert_eq!(f.prompts[2].line, 6);
        assert_eq!(f.skipped_cjk, 1);
        std::fs::write(&p, b"ok\nfine\nbad \xff byte\n").unwrap();
        let e = read_prompts(&p, false).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("UTF-8"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(read_prompts(&p, false).unwrap().prompts.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
