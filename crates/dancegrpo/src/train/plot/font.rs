//! A tiny built-in 5x7 bitmap font for plot tick labels: the digits, `-`, `+`,
//! `.`, `e` and space. Any other character renders blank. Text is drawn at an
//! integer scale (each font pixel becomes a `scale x scale` block).

/// Glyph width in font pixels.
pub const GLYPH_W: usize = 5;

/// Glyph height in font pixels.
pub const GLYPH_H: usize = 7;

/// Distance between the left edges of neighbouring glyphs, in font pixels
/// (the glyph and one blank column).
pub const ADVANCE: usize = GLYPH_W + 1;

/// Every character the font covers (space included: it is blank).
pub const CHARS: &str = "0123456789-+.e ";

/// The bitmap of `c`: one entry per row, top row first; bit 4 is the leftmost
/// column, bit 0 the rightmost. Characters outside [`CHARS`] are blank.
pub fn glyph(c: char) -> [u8; GLYPH_H] {
    match c {
        '0' => [
            0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110,
        ],
        '1' => [
            0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110,
        ],
        '2' => [
            0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111,
        ],
        '3' => [
            0b01110, 0b10001, 0b00001, 0b00110, 0b00001, 0b10001, 0b01110,
        ],
        '4' => [
            0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010,
        ],
        '5' => [
            0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110,
        ],
        '6' => [
            0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110,
        ],
        '7' => [
            0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000,
        ],
        '8' => [
            0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110,
        ],
        '9' => [
            0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100,
        ],
        '-' => [
            0b00000, 0b00000, 0b00000, 0b01110, 0b00000, 0b00000, 0b00000,
        ],
        '+' => [
            0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000,
        ],
        '.' => [
            0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100,
        ],
        'e' => [
            0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110,
        ],
        _ => [0; GLYPH_H],
    }
}

/// The pixel size `(width, height)` of `text` drawn at `scale` (no blank
/// column after the last glyph).
pub fn text_size(text: &str, scale: usize) -> (usize, usize) {
    let n = text.chars().count();
    ((n * ADVANCE).saturating_sub(1) * scale, GLYPH_H * scale)
}

/// The lit pixels `(x, y)` of `text` drawn at `scale`, relative to the top-left
/// corner of its [`text_size`] box.
pub fn text_pixels(text: &str, scale: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    text.chars().enumerate().flat_map(move |(i, c)| {
        let rows = glyph(c);
        (0..GLYPH_H * scale).flat_map(move |y| {
            (0..GLYPH_W * scale).filter_map(move |x| {
                let lit = (rows[y / scale] >> (GLYPH_W - 1 - x / scale)) & 1 == 1;
                lit.then_some((i * ADVANCE * scale + x, y))
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_glyph_differs_from_every_other() {
        let chars: Vec<char> = CHARS.chars().collect();
        for (i, &a) in chars.iter().enumerate() {
            for &b in &chars[i + 1..] {
                assert_ne!(glyph(a), glyph(b), "{a:?} and {b:?} look the same");
            }
        }
    }

    #[test]
    fn glyphs_fit_their_box_and_only_space_and_unknowns_are_blank() {
        for c in CHARS.chars() {
            let rows = glyph(c);
            assert!(rows.iter().all(|&r| r < 1 << GLYPH_W), "{c:?} is too wide");
            assert_eq!(rows == [0; GLYPH_H], c == ' ', "{c:?}");
        }
        for c in ['a', 'x', 'E', ',', '%', 'é'] {
            assert_eq!(glyph(c), [0; GLYPH_H], "{c:?} should be blank");
        }
    }

    #[test]
    fn text_size_counts_glyphs_and_gaps() {
        assert_eq!(text_size("", 1), (0, 7));
        assert_eq!(text_size("1", 1), (5, 7));
        assert_eq!(text_size("-0.5", 1), (23, 7));
        assert_eq!(text_size("-0.5", 3), (69, 21));
    }

    #[test]
    fn text_pixels_follow_the_bitmaps_at_scale() {
        let one: HashSet<_> = text_pixels("1", 1).collect();
        let bits: u32 = glyph('1').iter().map(|r| r.count_ones()).sum();
        assert_eq!(one.len(), bits as usize);
        assert!(one.contains(&(2, 0)) && one.contains(&(1, 1)) && !one.contains(&(0, 0)));
        // at scale 2 every font pixel is a 2x2 block; the second glyph starts
        // one advance to the right and the space between them stays blank
        let two: HashSet<_> = text_pixels("1 1", 2).collect();
        assert_eq!(two.len(), 2 * 4 * bits as usize);
        for &(x, y) in &one {
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                assert!(two.contains(&(2 * x + dx, 2 * y + dy)));
                assert!(two.contains(&(2 * (x + 2 * ADVANCE) + dx, 2 * y + dy)));
            }
        }
        let (w, h) = text_size("1 1", 2);
        assert!(two.iter().all(|&(x, y)| x < w && y < h));
        assert!(!two
            .iter()
            .any(|&(x, _)| (2 * ADVANCE..4 * ADVANCE).contains(&x)));
    }
}
