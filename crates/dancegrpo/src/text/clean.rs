//! open_clip's text cleaning: `ftfy.fix_text`, `html.unescape` twice, whitespace
//! collapse and strip, Python `str.lower`.
//!
//! Differences from the reference, all outside plain ASCII prompts:
//! * of `ftfy.fix_text` only the character-level fixers are implemented (HTML
//!   entities, C1 controls as Windows-1252, Latin ligatures, full/half width forms,
//!   curly quotes, line breaks, terminal escapes, control characters, NFC); its
//!   mojibake repair (`fix_encoding`, e.g. `cafÃ©` -> `café`) is not;
//! * named HTML entities are a subset of HTML5's 2231 (see [`ENTITIES`]); numeric
//!   references follow Python's `html.unescape` exactly.

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// Whether a named entity also decodes without its `;` (HTML5 "legacy" names).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Semicolon {
    Optional,
    Required,
}

use Semicolon::{Optional as O, Required as R};

/// Named HTML entities known to the cleaner (a subset of `html.entities.html5`).
const ENTITIES: &[(&str, &str, Semicolon)] = &[
    ("amp", "&", O), ("lt", "<", O), ("gt", ">", O), ("quot", "\"", O), ("apos", "'", R),
    ("AMP", "&", O), ("LT", "<", O), ("GT", ">", O), ("QUOT", "\"", O), ("COPY", "©", O),
    ("REG", "®", O), ("nbsp", "\u{a0}", O), ("copy", "©", O), ("reg", "®", O),
    ("trade", "™", R), ("hellip", "…", R), ("mdash", "—", R), ("ndash", "–", R),
    ("lsquo", "‘", R), ("rsquo", "’", R), ("ldquo", "“", R), ("rdquo", "”", R),
    ("laquo", "«", O), ("raquo", "»", O), ("deg", "°", O), ("times", "×", O),
    ("divide", "÷", O), ("euro", "€", R), ("pound", "£", O), ("yen", "¥", O),
    ("cent", "¢", O), ("sect", "§", O), ("para", "¶", O), ("middot", "·", O),
    ("bull", "•", R), ("iexcl", "¡", O), ("iquest", "¿", O), ("plusmn", "±", O),
    ("micro", "µ", O), ("frac12", "½", O), ("frac14", "¼", O), ("frac34", "¾", O),
    ("sup2", "²", O), ("acute", "´", O), ("shy", "\u{ad}", O), ("eacute", "é", O),
    ("egrave", "è", O), ("ecirc", "ê", O), ("aacute", "á", O), ("agrave", "à", O),
    ("acirc", "â", O), ("auml", "ä", O), ("ouml", "ö", O), ("uuml", "ü", O),
    ("szlig", "ß", O), ("ntilde", "ñ", O), ("ccedil", "ç", O), ("oacute", "ó", O),
    ("iacute", "í", O), ("uacute", "ú", O), ("Eacute", "É", O), ("Auml", "Ä", O),
    ("Ouml", "Ö", O), ("Uuml", "Ü", O), ("Ntilde", "Ñ", O), ("hearts", "♥", R),
    ("star", "☆", R), ("larr", "←", R), ("rarr", "→", R),
];

/// Windows-1252 for 0x80..=0x9F (undefined bytes map to themselves), as used by
/// `html.unescape` for `&#128;`.. and by ftfy's `fix_c1_controls`.
const CP1252: [char; 32] = [
    '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
    '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
    'ž', 'Ÿ',
];

/// open_clip's `_clean_lower` (`whitespace_clean(basic_clean(text)).lower()`).
pub(crate) struct OpenClipCleaner {
    ansi: Regex,
}

impl OpenClipCleaner {
    /// A cleaner (compiles its one regex).
    pub fn new() -> Self {
        OpenClipCleaner {
            ansi: Regex::new(r"\x1b\[(?:\d|;)*[a-zA-Z]").expect("static regex"),
        }
    }

    /// Cleans `text` as open_clip does before BPE.
    pub fn clean(&self, text: &str) -> String {
        let fixed = self.fix_text(text);
        let unescaped = html_unescape(&html_unescape(&fixed));
        let collapsed = unescaped
            .split(py_space)
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        collapsed.to_lowercase()
    }

    /// ftfy's `fix_text` without mojibake repair: line by line, each line fixed
    /// until stable; HTML unescaping stops for good at the first line with `<`.
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
        let mut s = if html { ftfy_unescape(text) } else { text.to_string() };
        s = s.chars().flat_map(fix_char).collect();
        s = s
            .replace("\r\n", "\n")
            .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        s = self.ansi.replace_all(&s, "").into_owned();
        s.chars().filter(|&c| !is_ftfy_control(c)).nfc().collect()
    }
}

/// Per-character ftfy fixes: C1 controls, ligatures, character width, curly quotes.
fn fix_char(c: char) -> Vec<char> {
    let mapped: &str = match c {
        '\u{80}'..='\u{9f}' => return vec![CP1252[c as usize - 0x80]],
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => "'",
        '\u{201c}'..='\u{201f}' => "\"",
        '\u{3000}' => " ",
        '\u{ff01}'..='\u{ffef}' => return c.to_string().nfkc().collect(),
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

/// Characters ftfy's `remove_control_chars` deletes.
fn is_ftfy_control(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
}

/// Python's `str.isspace`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// ftfy's `unescape_html`: only `&name;` / `&#..;` (1 to 24 alphanumerics), named
/// ones also in all caps for lowercase names.
fn ftfy_unescape(text: &str) -> String {
    replace_refs(text, |rest| {
        let body_len = rest[1..]
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'#')
            .count();
        let body = &rest[1..1 + body_len];
        let hash = usize::from(body.starts_with('#'));
        let name = &body[hash..];
        if !(1..=24).contains(&name.len())
            || name.contains('#')
            || rest.as_bytes().get(1 + body_len) != Some(&b';')
        {
            return None;
        }
        let whole = &rest[..body_len + 2];
        if hash == 1 {
            let out = html_unescape(whole);
            return (!out.contains(';')).then_some((out, whole.len()));
        }
        let value = named(name).map(str::to_string).or_else(|| {
            let lower = name.to_lowercase();
            (name == name.to_uppercase() && named(name).is_none())
                .then(|| named(&lower).map(str::to_uppercase))
                .flatten()
        })?;
        Some((value, whole.len()))
    })
}

fn named(name: &str) -> Option<&'static str> {
    ENTITIES.iter().find(|(n, _, _)| *n == name).map(|(_, v, _)| *v)
}

/// Python's `html.unescape` (numeric references exactly, named ones from
/// [`ENTITIES`]).
pub(crate) fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    replace_refs(text, |rest| {
        let b = rest.as_bytes();
        if b.get(1) == Some(&b'#') {
            numeric_ref(rest)
        } else {
            named_ref(rest)
        }
    })
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

/// `&name;` (or a legacy `&name` prefix) as Python's `html.unescape`.
fn named_ref(rest: &str) -> Option<(String, usize)> {
    let body_len: usize = rest[1..]
        .chars()
        .take_while(|c| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'))
        .take(32)
        .map(char::len_utf8)
        .sum();
    if body_len == 0 {
        return None;
    }
    let body = &rest[1..1 + body_len];
    let semi = rest[1 + body_len..].starts_with(';');
    if semi {
        if let Some(v) = named(body) {
            return Some((v.to_string(), body_len + 2));
        }
    } else if let Some(v) = legacy(body) {
        return Some((v.to_string(), body_len + 1));
    }
    // The longest legacy name (no `;`) that is a proper prefix of at least 2 chars.
    let bounds: Vec<usize> = body
        .char_indices()
        .map(|(i, _)| i)
        .chain([body.len()])
        .collect();
    let s_chars = bounds.len() - 1 + usize::from(semi);
    (2..s_chars)
        .rev()
        .find_map(|x| legacy(&body[..bounds[x]]).map(|v| (v.to_string(), 1 + bounds[x])))
}

/// A named entity that also decodes without `;`.
fn legacy(name: &str) -> Option<&'static str> {
    ENTITIES
        .iter()
        .find(|(e, _, s)| *e == name && *s == Semicolon::Optional)
        .map(|(_, v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_matches_python() {
        assert_eq!(html_unescape("a &amp; b &lt;c&gt;"), "a & b <c>");
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
        assert_eq!(html_unescape("&#65;&#x42;&#X43&#128;&#0;"), "ABC€\u{fffd}");
        assert_eq!(html_unescape("&ampfoo &notanentity; &#;"), "&foo &notanentity; &#;");
        assert_eq!(html_unescape("&#xD800;&#1114112;&#1;x"), "\u{fffd}\u{fffd}x");
    }

    #[test]
    fn open_clip_clean_fixes_quotes_width_and_whitespace() {
        let c = OpenClipCleaner::new();
        assert_eq!(c.clean("  It’s a  “ＴＥＳＴ”\n\tof &amp;amp; ﬁsh  "), "it's a \"test\" of & fish");
        assert_eq!(c.clean("ΟΔΟΣ"), "οδος");
        assert_eq!(c.clean("\u{1b}[31mred\u{1b}[0m\u{1c}x"), "redx");
    }
}
