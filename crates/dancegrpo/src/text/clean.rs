//! The text cleaning of the Python CLIP tokenizers: `ftfy.fix_text`, then
//! (open_clip only) `html.unescape` twice, then whitespace collapse and strip and
//! Python's `str.lower`.
//!
//! `ftfy.fix_text` (6.3.1, default settings) is followed step by step: HTML
//! entities, mojibake repair ([`super::mojibake`]), C1 controls as Windows-1252,
//! Latin ligatures, full/half width forms, curly quotes, line breaks, terminal
//! escapes, control characters, NFC; each line repeated until it stops changing.
//! Not followed: ftfy's split of lines over 1,000,000 characters.
//!
//! HTML unescaping follows Python's `html.unescape` (and ftfy's stricter variant)
//! exactly, with the HTML5 entity table (`html5_entities.tsv`: the 2231 names of
//! the WHATWG list, `;` included where required, and their code points).

use std::collections::HashMap;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use super::mojibake::{Mojibake, CP1252};

/// The HTML5 named character references: `name[;]<TAB>hex code points`.
const HTML5_ENTITIES: &str = include_str!("html5_entities.tsv");

/// Which Python tokenizer's cleaning a [`TextCleaner`] reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cleaning {
    /// open_clip's `_clean_lower`: `whitespace_clean(basic_clean(text)).lower()`
    /// (ftfy, `html.unescape` twice).
    OpenClip,
    /// transformers' slow `CLIPTokenizer` with ftfy installed:
    /// `whitespace_clean(ftfy.fix_text(text)).lower()`.
    SlowClipTokenizer,
}

/// A Python CLIP tokenizer's text cleaning.
pub(crate) struct TextCleaner {
    cleaning: Cleaning,
    ansi: Regex,
    /// Python's `html.entities.html5`: name (with `;` where required) -> text.
    html5: HashMap<String, String>,
    /// ftfy's entity table: `&name;` -> text, plus all-caps variants.
    ftfy: HashMap<String, String>,
    mojibake: Mojibake,
}

impl TextCleaner {
    /// A cleaner (compiles its regexes).
    pub fn new(cleaning: Cleaning) -> Self {
        let html5: HashMap<String, String> = HTML5_ENTITIES
            .lines()
            .filter_map(|line| {
                let (name, points) = line.split_once('\t')?;
                let text = points
                    .split(' ')
                    .map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
                    .collect::<Option<String>>()?;
                Some((name.to_string(), text))
            })
            .collect();
        let mut cleaner = TextCleaner {
            cleaning,
            ansi: Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").expect("static regex"),
            html5,
            ftfy: HashMap::new(),
            mojibake: Mojibake::new(),
        };
        cleaner.ftfy = cleaner.ftfy_entities();
        cleaner
    }

    /// ftfy's `HTML_ENTITIES`: every `&name;`, and for lowercase names the
    /// all-caps form (mapping to the uppercased text) when Python's
    /// `html.unescape` leaves that form unchanged.
    fn ftfy_entities(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for (name, text) in &self.html5 {
            if !name.ends_with(';') {
                continue;
            }
            out.insert(format!("&{name}"), text.clone());
            if *name == name.to_lowercase() {
                let upper = format!("&{}", name.to_uppercase());
                if self.html_unescape(&upper) == upper {
                    out.insert(upper, text.to_uppercase());
                }
            }
        }
        out
    }

    /// Cleans `text` as the tokenizer does before BPE.
    pub fn clean(&self, text: &str) -> String {
        let mut fixed = self.fix_text(text);
        if self.cleaning == Cleaning::OpenClip {
            fixed = self.html_unescape(&self.html_unescape(&fixed));
        }
        let collapsed = fixed
            .split(py_space)
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        collapsed.to_lowercase()
    }

    /// ftfy's `fix_text`: line by line, each line fixed until stable; HTML
    /// unescaping stops for good at the first line with `<`.
    fn fix_text(&self, text: &str) -> String {
        let mut html = true;
        let mut out = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            if line.contains('<') {
                html = false;
            }
            let mut cur = line.to_string();
            loop {
                let next = self.fix_once(&cur, html);
                if next == cur {
                    break;
                }
                cur = next;
            }
            out.push_str(&cur);
        }
        out
    }

    fn fix_once(&self, text: &str, html: bool) -> String {
        let mut s = if html {
            self.ftfy_unescape(text)
        } else {
            text.to_string()
        };
        s = self.mojibake.fix_encoding(&s);
        for fix in [c1_control, latin_ligature, character_width, uncurl_quote] as [CharFix; 4] {
            s = s.chars().flat_map(fix).collect();
        }
        s = s
            .replace("\r\n", "\n")
            .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        s = self.ansi.replace_all(&s, "").into_owned();
        s.chars().filter(|&c| !is_ftfy_control(c)).nfc().collect()
    }
}

/// A character fix of ftfy's: the replacement of one character.
type CharFix = fn(char) -> Vec<char>;

/// ftfy's `fix_c1_controls`: C1 controls read as Windows-1252.
fn c1_control(c: char) -> Vec<char> {
    match c {
        '\u{80}'..='\u{9f}' => vec![CP1252[c as usize - 0x80]],
        _ => vec![c],
    }
}

/// ftfy's `fix_latin_ligatures`.
fn latin_ligature(c: char) -> Vec<char> {
    let mapped = match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return vec![c],
    };
    mapped.chars().collect()
}

/// ftfy's `fix_character_width`: full and half width forms as NFKC has them.
fn character_width(c: char) -> Vec<char> {
    match c {
        '\u{3000}' => vec![' '],
        '\u{ff01}'..='\u{ffef}' => c.to_string().nfkc().collect(),
        _ => vec![c],
    }
}

/// ftfy's `uncurl_quotes`.
fn uncurl_quote(c: char) -> Vec<char> {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => vec!['\''],
        '\u{201c}'..='\u{201f}' => vec!['"'],
        _ => vec![c],
    }
}

/// Characters ftfy's `remove_control_chars` deletes.
fn is_ftfy_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

/// Python's `str.isspace`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

impl TextCleaner {
    /// ftfy's `unescape_html`: `&#?[0-9A-Za-z]{1,24};` replaced when it is in
    /// ftfy's table, or numeric and decoded by `html.unescape`.
    fn ftfy_unescape(&self, text: &str) -> String {
        replace_refs(text, |rest| {
            let b = rest.as_bytes();
            let hash = usize::from(b.get(1) == Some(&b'#'));
            let n = b[1 + hash..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            if !(1..=24).contains(&n) || b.get(1 + hash + n) != Some(&b';') {
                return None;
            }
            let whole = &rest[..2 + hash + n];
            if let Some(v) = self.ftfy.get(whole) {
                return Some((v.clone(), whole.len()));
            }
            if hash == 0 {
                return None;
            }
            let out = self.html_unescape(whole);
            (!out.contains(';')).then_some((out, whole.len()))
        })
    }

    /// Python's `html.unescape`.
    pub fn html_unescape(&self, text: &str) -> String {
        if !text.contains('&') {
            return text.to_string();
        }
        replace_refs(text, |rest| {
            if rest.as_bytes().get(1) == Some(&b'#') {
                numeric_ref(rest)
            } else {
                self.named_ref(rest)
            }
        })
    }

    /// `&name;` (or the longest entity name that is a proper prefix) as Python's
    /// `html.unescape`.
    fn named_ref(&self, rest: &str) -> Option<(String, usize)> {
        let body_len: usize = rest[1..]
            .chars()
            .take_while(|c| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'))
            .take(32)
            .map(char::len_utf8)
            .sum();
        if body_len == 0 {
            return None;
        }
        let semi = rest[1 + body_len..].starts_with(';');
        // `s` is the name plus its `;` if any, as Python's match group.
        let s = &rest[1..1 + body_len + usize::from(semi)];
        if let Some(v) = self.html5.get(s) {
            return Some((v.clone(), 1 + s.len()));
        }
        let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
        (2..bounds.len()).rev().find_map(|x| {
            let prefix = &s[..bounds[x]];
            self.html5
                .get(prefix)
                .map(|v| (v.clone(), 1 + prefix.len()))
        })
    }
}

/// Runs `decode` at every `&`; `decode` returns the replacement and how many bytes
/// of the input it consumed, or `None` to keep the `&`.
fn replace_refs(text: &str, decode: impl Fn(&str) -> Option<(String, usize)>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(off) = text[i..].find('&') {
        out.push_str(&text[i..i + off]);
        i += off;
        match decode(&text[i..]) {
            Some((value, used)) => {
                out.push_str(&value);
                i += used;
            }
            None => {
                out.push('&');
                i += 1;
            }
        }
    }
    out.push_str(&text[i..]);
    out
}

/// `&#123;` / `&#x1F;` (the `;` optional) with Python's replacement rules.
fn numeric_ref(rest: &str) -> Option<(String, usize)> {
    let b = rest.as_bytes();
    let (radix, start) = match b.get(2) {
        Some(b'x' | b'X') => (16, 3),
        _ => (10, 2),
    };
    let digits = b[start..]
        .iter()
        .take_while(|c| c.is_ascii_digit() || (radix == 16 && c.is_ascii_hexdigit()))
        .count();
    if digits == 0 {
        return None;
    }
    let end = start + digits;
    let used = end + usize::from(b.get(end) == Some(&b';'));
    let num = u32::from_str_radix(&rest[start..end], radix).unwrap_or(u32::MAX);
    let value = match num {
        0 => "\u{fffd}".to_string(),
        0x0d => "\r".to_string(),
        0x80..=0x9f => CP1252[num as usize - 0x80].to_string(),
        0xd800..=0xdfff | 0x11_0000.. => "\u{fffd}".to_string(),
        0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
        n if n & 0xfffe == 0xfffe => String::new(),
        n => char::from_u32(n).map(String::from).unwrap_or_default(),
    };
    Some((value, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_matches_python() {
        let c = TextCleaner::new(Cleaning::OpenClip);
        let html_unescape = |t: &str| c.html_unescape(t);
        assert_eq!(html_unescape("a &amp; b &lt;c&gt;"), "a & b <c>");
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
        assert_eq!(html_unescape("&#65;&#x42;&#X43&#128;&#0;"), "ABC€\u{fffd}");
        assert_eq!(
            html_unescape("&ampfoo &notanentity; &#;"),
            "&foo ¬anentity; &#;"
        );
        assert_eq!(
            html_unescape("&#xD800;&#1114112;&#1;x"),
            "\u{fffd}\u{fffd}x"
        );
        assert_eq!(html_unescape("&not &notit; &notin; &spades;"), "¬ ¬it; ∉ ♠");
        assert_eq!(c.ftfy_unescape("&EACUTE; &eacute &Eacute;"), "É &eacute É");
    }

    #[test]
    fn open_clip_clean_fixes_quotes_width_and_whitespace() {
        let c = TextCleaner::new(Cleaning::OpenClip);
        assert_eq!(
            c.clean("  It’s a  “ＴＥＳＴ”\n\tof &amp;amp; ﬁsh  "),
            "it's a \"test\" of & fish"
        );
        assert_eq!(c.clean("ΟΔΟΣ"), "οδος");
        assert_eq!(c.clean("\u{1b}[31mred\u{1b}[0m\u{1c}x"), "redx");
    }

    /// `ftfy.fix_text` on 3,025 strings, mojibake one and two layers deep in
    /// the ten encodings ftfy knows, lost bytes, NBSPs turned into spaces, random
    /// Unicode (made by `tools/ftfy_reference.py` with ftfy 6.3.1).
    #[test]
    fn fix_text_matches_ftfy() {
        let c = TextCleaner::new(Cleaning::OpenClip);
        let cases = include_str!("testdata/ftfy_cases.jsonl");
        let mut wrong = Vec::new();
        for line in cases.lines() {
            let [input, want]: [String; 2] = serde_json::from_str(line).expect("case");
            let got = c.fix_text(&input);
            if got != want {
                wrong.push(format!("{input:?}: got {got:?}, ftfy {want:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} differ:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(20)].join("\n")
        );
        assert_eq!(cases.lines().count(), 3025);
    }
}
