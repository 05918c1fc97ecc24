//! ftfy's mojibake repair (`ftfy.fix_encoding`, ftfy 6.3.1): text that was UTF-8
//! but was decoded as a single-byte encoding (`cafÃ©`, `â€œquotedâ€`, `Ð¼Ð¾Ñ`)
//! is encoded back to those bytes and decoded as UTF-8.
//!
//! The steps, as ftfy takes them, repeated until the text stops changing:
//! 1. ASCII text, and text its heuristic does not find suspicious, stays as it is.
//! 2. For each of ten single-byte encodings in ftfy's order (Latin-1, its "sloppy"
//!    Windows code pages whose undefined bytes decode as Latin-1, ISO-8859-2,
//!    MacRoman, CP437) that can represent the whole text: encode it, put back
//!    `0xA0` bytes that were turned into spaces (not for MacRoman), replace byte
//!    runs whose information was lost (sloppy encodings only), and decode as UTF-8
//!    (CESU-8 surrogate pairs and Java's `C0 80` null allowed); the first success
//!    is the answer.
//! 3. Otherwise fix UTF-8 mojibake runs embedded in otherwise good text, one by one.
//! 4. Otherwise C1 controls are read as Windows-1252.
//!
//! Why hand-written: the reference runs ftfy; the one Rust port (`plsfix` 0.1.8)
//! disagreed with ftfy 6.3.1 on 388 of 4,008 seeded test strings (terminal escapes
//! kept, Windows-1257/1253 layers not undone). The encodings and the character
//! classes of ftfy's heuristics are data generated from ftfy itself
//! (`tools/ftfy_reference.py` -> `ftfy_tables.txt`); a unit test of the cleaner
//! checks it against `ftfy.fix_text` on 3,025 strings (`testdata/ftfy_cases.jsonl`).

use std::collections::HashMap;

use regex::bytes::Regex as BytesRegex;
use regex::Regex;

/// Windows-1252 for 0x80..=0x9F (undefined bytes map to themselves), as used by
/// `html.unescape` for `&#128;`.. and by ftfy's `fix_c1_controls`.
pub(super) const CP1252: [char; 32] = [
    '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}',
    '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
];

/// Encoding tables and character classes, generated from ftfy.
const TABLES: &str = include_str!("ftfy_tables.txt");

/// What sets one single-byte encoding's treatment apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// A Windows code page with undefined bytes read as Latin-1 and U+FFFD as 0x1A.
    Sloppy,
    /// Mac OS Roman (no 0xA0 restoration: an en dash and a space look like it).
    MacRoman,
    /// Latin-1, ISO-8859-2, CP437.
    Plain,
}

/// One single-byte encoding: the byte each character it can represent encodes to.
struct Charmap {
    family: Family,
    encode: HashMap<char, u8>,
}

impl Charmap {
    fn parse(name: &str, points: &str) -> Charmap {
        let decode: Vec<char> = points.split(' ').map(point).collect();
        assert_eq!(decode.len(), 256, "charmap {name}");
        // ftfy encodes ASCII other than 0x1A as itself, and what bytes 0x80.. and
        // 0x1A decode to as those bytes (no two bytes decode alike: checked when
        // the tables are generated).
        let mut encode: HashMap<char, u8> = (0u8..0x80)
            .filter(|&b| b != 0x1a)
            .map(|b| (char::from(b), b))
            .collect();
        for b in (0x80..=0xff).chain([0x1a]) {
            encode.insert(decode[usize::from(b)], b);
        }
        let family = match name {
            "macroman" => Family::MacRoman,
            n if n.starts_with("sloppy-") => Family::Sloppy,
            _ => Family::Plain,
        };
        Charmap { family, encode }
    }

    /// The text as this encoding's bytes, or `None` when a character is not in it.
    fn encode(&self, text: &str) -> Option<Vec<u8>> {
        text.chars().map(|c| self.encode.get(&c).copied()).collect()
    }
}

/// ftfy's `fix_encoding`; build once, use for many texts.
pub(crate) struct Mojibake {
    charmaps: Vec<Charmap>,
    /// ftfy's `badness` heuristic: a match means "looks like mojibake".
    badness: Regex,
    /// One run of UTF-8-shaped mojibake, anchored at the start.
    utf8_run: Regex,
    /// Characters that, before a run, mean it is not the start of one.
    continuation: Vec<(char, char)>,
    /// UTF-8 byte sequences with a 0xA0 byte turned into a space.
    altered_a0: BytesRegex,
    /// UTF-8 byte sequences where bytes were lost (`?` or 0x1A in their place).
    lossy: BytesRegex,
}

impl Mojibake {
    /// Parses the tables and compiles the heuristics.
    pub fn new() -> Self {
        let mut charmaps = Vec::new();
        let mut classes = HashMap::new();
        for line in TABLES.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("charmap"), Some(n), Some(b)) => charmaps.push(Charmap::parse(n, b)),
                (Some("class"), Some(n), Some(b)) => {
                    classes.insert(n.to_string(), ranges(b));
                }
                _ => panic!("ftfy_tables.txt: bad line {line:?}"),
            }
        }
        let continuation = classes["utf8_continuation_strict"].clone();
        let bodies: HashMap<String, String> = classes
            .iter()
            .map(|(name, r)| (name.clone(), class_body(r)))
            .collect();
        Mojibake {
            charmaps,
            badness: compile(&BADNESS_PARTS.join("|").replace("\\s", PY_SPACE), &bodies),
            utf8_run: compile(UTF8_RUN, &bodies),
            continuation,
            altered_a0: bytes_regex(&ALTERED_A0),
            lossy: bytes_regex(&LOSSY),
        }
    }

    /// Whether ftfy's heuristic finds the text suspicious.
    pub fn is_bad(&self, text: &str) -> bool {
        self.badness.is_match(text)
    }

    /// ftfy's `fix_encoding`: one repair step after another until none applies.
    pub fn fix_encoding(&self, text: &str) -> String {
        let mut cur = text.to_string();
        loop {
            let next = self.fix_step(&cur);
            if next == cur {
                return cur;
            }
            cur = next;
        }
    }

    fn fix_step(&self, text: &str) -> String {
        if text.is_ascii() || !self.is_bad(text) {
            return text.to_string();
        }
        for map in &self.charmaps {
            let Some(bytes) = map.encode(text) else {
                continue;
            };
            if let Some(fixed) = self.reread_utf8(map.family, bytes) {
                return fixed;
            }
        }
        let fixed = self.fix_embedded(text);
        if fixed != text {
            return fixed;
        }
        // ftfy's last two steps, Latin-1 text re-read as Windows-1252 when it
        // decodes strictly, then C1 controls read as sloppy Windows-1252, come to
        // the same thing: every C1 control that Windows-1252 defines is replaced.
        text.chars().map(cp1252).collect()
    }

    /// Bytes of a single-byte encoding read as UTF-8 after ftfy's byte repairs.
    fn reread_utf8(&self, family: Family, mut bytes: Vec<u8>) -> Option<String> {
        if family != Family::MacRoman && self.altered_a0.is_match(&bytes) {
            bytes = self.restore_a0(&bytes);
        }
        if family == Family::Sloppy {
            bytes = self
                .lossy
                .replace_all(&bytes, "\u{fffd}".as_bytes())
                .into_owned();
        }
        decode_utf8_variants(&bytes)
    }

    /// ftfy's `restore_byte_a0`: `C3 20` as a word of its own becomes `C3 A0 20`
    /// (`Ã la` -> `à la`), then spaces inside altered sequences become `A0`.
    fn restore_a0(&self, bytes: &[u8]) -> Vec<u8> {
        const KEEP: [&[u8]; 5] = [b" ", b"quele", b"quela", b"quilo", b"s "];
        let mut out = Vec::with_capacity(bytes.len() + 4);
        let mut i = 0;
        while i < bytes.len() {
            let rest = &bytes[i..];
            if rest.starts_with(b"\xc3 ") && !KEEP.iter().any(|k| rest[2..].starts_with(k)) {
                out.extend_from_slice(b"\xc3\xa0 ");
                i += 2;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        let spaced = |m: &regex::bytes::Captures| -> Vec<u8> {
            m[0].iter()
                .map(|&b| if b == b' ' { 0xa0 } else { b })
                .collect()
        };
        self.altered_a0.replace_all(&out, spaced).into_owned()
    }

    /// ftfy's `decode_inconsistent_utf8`: each UTF-8-shaped run (not preceded by
    /// a continuation character) that is shorter than the text and suspicious is
    /// repaired on its own.
    fn fix_embedded(&self, text: &str) -> String {
        let total = text.chars().count();
        let mut out = String::with_capacity(text.len());
        let (mut pos, mut copied) = (0, 0);
        let mut prev: Option<char> = None;
        while let Some(here) = text[pos..].chars().next() {
            let starts = !prev.is_some_and(|c| self.is_continuation(c));
            if let Some(m) = self.utf8_run.find(&text[pos..]).filter(|_| starts) {
                let run = m.as_str();
                out.push_str(&text[copied..pos]);
                if run.chars().count() < total && self.is_bad(run) {
                    out.push_str(&self.fix_encoding(run));
                } else {
                    out.push_str(run);
                }
                pos += run.len();
                copied = pos;
                prev = run.chars().next_back();
                continue;
            }
            prev = Some(here);
            pos += here.len_utf8();
        }
        out.push_str(&text[copied..]);
        out
    }

    fn is_continuation(&self, c: char) -> bool {
        self.continuation.iter().any(|&(a, b)| (a..=b).contains(&c))
    }
}

/// Windows-1252 for a C1 control (undefined bytes stay), everything else as is.
fn cp1252(c: char) -> char {
    match c {
        '\u{80}'..='\u{9f}' => CP1252[c as usize - 0x80],
        _ => c,
    }
}

/// UTF-8 that may also hold CESU-8 surrogate pairs and `C0 80` for U+0000
/// (ftfy's `utf-8-variants`); `None` when it is not that.
fn decode_utf8_variants(bytes: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(bytes.len());
    let (mut i, mut start) = (0, 0);
    while i < bytes.len() {
        let rest = &bytes[i..];
        let special = if rest.starts_with(b"\xc0\x80") {
            Some(('\0', 2))
        } else {
            cesu_pair(rest).map(|c| (c, 6))
        };
        match special {
            Some((c, used)) => {
                out.push_str(std::str::from_utf8(&bytes[start..i]).ok()?);
                out.push(c);
                i += used;
                start = i;
            }
            None => i += 1,
        }
    }
    out.push_str(std::str::from_utf8(&bytes[start..]).ok()?);
    Some(out)
}

/// A six-byte CESU-8 surrogate pair at the start of `b`, as its code point.
fn cesu_pair(b: &[u8]) -> Option<char> {
    let cont = |x: u8| (0x80..=0xbf).contains(&x);
    let pair = b.len() >= 6
        && b[0] == 0xed
        && (0xa0..=0xaf).contains(&b[1])
        && cont(b[2])
        && b[3] == 0xed
        && (0xb0..=0xbf).contains(&b[4])
        && cont(b[5]);
    if !pair {
        return None;
    }
    let bits = (u32::from(b[1] & 0x0f) << 16)
        | (u32::from(b[2] & 0x3f) << 10)
        | (u32::from(b[4] & 0x0f) << 6)
        | u32::from(b[5] & 0x3f);
    char::from_u32(bits + 0x10000)
}

/// A hexadecimal code point of the tables.
fn point(hex: &str) -> char {
    char::from_u32(u32::from_str_radix(hex, 16).expect("hex")).expect("code point")
}

/// `0080-009F 00A4`-style ranges of the tables.
fn ranges(body: &str) -> Vec<(char, char)> {
    body.split(' ')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => (point(a), point(b)),
            None => (point(r), point(r)),
        })
        .collect()
}

/// A regex class body (`\x{80}-\x{9F}\x{A4}-\x{A4}`) for the templates.
fn class_body(ranges: &[(char, char)]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| format!("\\x{{{:X}}}-\\x{{{:X}}}", u32::from(a), u32::from(b)))
        .collect()
}

/// A template with `{class}` names filled in from the tables.
fn compile(template: &str, classes: &HashMap<String, String>) -> Regex {
    let mut pattern = template.to_string();
    for (name, body) in classes {
        pattern = pattern.replace(&format!("{{{name}}}"), body);
    }
    let unfilled = Regex::new(r"\{[a-z_][a-z_0-9]*\}").expect("static regex");
    assert!(!unfilled.is_match(&pattern), "unfilled class in {template}");
    Regex::new(&pattern).expect("ftfy regex")
}

/// A byte-level alternation of `parts`.
fn bytes_regex(parts: &[&str]) -> BytesRegex {
    BytesRegex::new(&format!("(?-u){}", parts.join("|"))).expect("static regex")
}

/// Python's `\s` (`str.isspace`: Unicode white space plus 0x1C..0x1F).
const PY_SPACE: &str = r"[\s\x1c-\x1f]";

/// ftfy's `utf8_detector` without its look-behind (checked by the caller).
const UTF8_RUN: &str = "^(?:[{utf8_first_of_2}][{utf8_continuation}]\
    |[{utf8_first_of_3}][{utf8_continuation}]{2}\
    |[{utf8_first_of_4}][{utf8_continuation}]{3})+";

/// ftfy's `ALTERED_UTF8_RE`: a UTF-8 sequence with a space where `A0` belongs.
const ALTERED_A0: [&str; 6] = [
    r"[\xc2\xc3\xc5\xce\xd0\xd9] ",
    r"[\xe2\xe3] [\x80-\x84\x86-\x9f\xa1-\xbf]",
    r"[\xe0-\xe3][\x80-\x84\x86-\x9f\xa1-\xbf] ",
    r"\xf0 [\x80-\xbf][\x80-\xbf]",
    r"\xf0[\x80-\xbf] [\x80-\xbf]",
    r"\xf0[\x80-\xbf][\x80-\xbf] ",
];

/// ftfy's `LOSSY_UTF8_RE`: UTF-8 sequences with `?` or `1A` where bytes were lost.
const LOSSY: [&str; 10] = [
    r"[\xc2-\xdf]\x1a",
    r"[\xc2-\xc3]\?",
    r"\xed[\xa0-\xaf][\x1a?]\xed[\xb0-\xbf][\x1a?\x80-\xbf]",
    r"\xed[\xa0-\xaf][\x1a?\x80-\xbf]\xed[\xb0-\xbf][\x1a?]",
    r"[\xe0-\xef][\x1a?][\x1a\x80-\xbf]",
    r"[\xe0-\xef][\x1a\x80-\xbf][\x1a?]",
    r"[\xf0-\xf4][\x1a?][\x1a\x80-\xbf][\x1a\x80-\xbf]",
    r"[\xf0-\xf4][\x1a\x80-\xbf][\x1a?][\x1a\x80-\xbf]",
    r"[\xf0-\xf4][\x1a\x80-\xbf][\x1a\x80-\xbf][\x1a?]",
    r"\x1a",
];

/// ftfy's `badness` heuristic, one alternative per entry; `{name}` is a
/// character class of the tables. Unlikely neighbours: accented letters,
/// currency, box drawing, punctuation and the characters only mojibake produces,
/// in the combinations ftfy counts.
const BADNESS_PARTS: [&str; 37] = [
    "[{c1}]",
    "[{bad}{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}][{bad}]",
    "[a-zA-Z][{lower_common}{upper_common}][{bad}]",
    "[{bad}][{lower_accented}{upper_accented}{box}{start_punctuation}{end_punctuation}{currency}{numeric}{law}]",
    "[{lower_accented}{lower_common}{box}{end_punctuation}{currency}{numeric}][{upper_accented}]",
    "[{box}{end_punctuation}{currency}{numeric}][{lower_accented}]",
    "[{lower_accented}{box}{end_punctuation}][{currency}]",
    "\\s[{upper_accented}][{currency}]",
    "[{upper_accented}{box}][{numeric}{law}]",
    "[{lower_accented}{upper_accented}{box}{currency}{end_punctuation}][{start_punctuation}][{numeric}]",
    "[{lower_accented}{upper_accented}{currency}{numeric}{box}{law}][{end_punctuation}][{start_punctuation}]",
    "[{currency}{numeric}{box}][{start_punctuation}]",
    "[a-z][{upper_accented}][{start_punctuation}{currency}]",
    "[{box}][{kaomoji}]",
    "[{lower_accented}{upper_accented}{currency}{numeric}{start_punctuation}{end_punctuation}{law}][{box}]",
    "[{box}][{end_punctuation}]",
    // The last class is Python's `\w`: letters, numbers, underscore.
    "[{lower_accented}{upper_accented}][{start_punctuation}{end_punctuation}][\\p{L}\\p{N}_]",
    // The ligature œ before anything but an unaccented Latin letter.
    "[Œœ][^A-Za-z]",
    "[{upper_accented}]°",
    // Two-character Windows-1252 mojibake not covered above.
    "[ÂÃÎÐ][€œŠš¢£Ÿž\\xa0\\xad®©°·»{start_punctuation}{end_punctuation}–—´]",
    "×[²³]",
    // Windows-1252 mojibake of Arabic: four characters.
    "[ØÙ][{common}{currency}{bad}{numeric}{start_punctuation}ŸŠ®°µ»][ØÙ][{common}{currency}{bad}{numeric}{start_punctuation}ŸŠ®°µ»]",
    // Windows-1252 mojibake starting South Asian three-byte characters.
    "à[²µ¹¼½¾]",
    // MacRoman mojibake.
    "√[±∂†≠®™´≤≥¥µø]",
    "≈[°¢]",
    "‚Ä[ìîïòôúùû†°¢π]",
    "‚[âó][àä°ê]",
    // Windows-1251 mojibake of U+2000.. and of Latin-1 / Cyrillic.
    "вЂ",
    "[ВГРС][{c1}{bad}{start_punctuation}{end_punctuation}{currency}°µ][ВГРС]",
    "ГўВЂВ.[A-Za-z ]",
    // Windows-1252 forms of à, á and of U+00A0 itself.
    "Ã[\\xa0¡]",
    "[a-z]\\s?[ÃÂ] ",
    "^[ÃÂ] ",
    // Â standing before the very character it encodes.
    "[a-z.,?!{end_punctuation}]Â[ {start_punctuation}{end_punctuation}]",
    // Windows-1253 mojibake of U+2000.. and of Latin-1 / Greek.
    "β€[™\\xa0Ά\\xad®°]",
    "[ΒΓΞΟ][{c1}{bad}{start_punctuation}{end_punctuation}{currency}°][ΒΓΞΟ]",
    // Windows-1257 mojibake of U+2000..
    "ā€",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_the_documented_examples() {
        let m = Mojibake::new();
        assert_eq!(m.fix_encoding("sÃ³"), "só");
        assert_eq!(m.fix_encoding("voilÃ le travail"), "voilà le travail");
        assert_eq!(m.fix_encoding("Ã la mode"), "à la mode");
        assert_eq!(m.fix_encoding("ÃƒÂ©"), "é");
        assert_eq!(m.fix_encoding("Ð¼Ð¾Ñ\u{81}ÐºÐ²Ð°"), "москва");
        assert_eq!(m.fix_encoding("&ATILDE;&SUP3;"), "&ATILDE;&SUP3;");
        assert_eq!(m.fix_encoding("a plain café"), "a plain café");
        assert!(!m.is_bad("naïve façade"));
    }

    #[test]
    fn utf8_variants_read_cesu_pairs_and_java_nulls() {
        assert_eq!(
            decode_utf8_variants(b"a\xc0\x80b\xed\xa0\xbd\xed\xb8\x8d").as_deref(),
            Some("a\0b\u{1f60d}")
        );
        assert_eq!(decode_utf8_variants(b"\xed\xa0\xbd"), None);
        assert_eq!(decode_utf8_variants(b"\xc0"), None);
    }
}
