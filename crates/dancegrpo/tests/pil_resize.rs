//! `imaging::pil::resize_rgb` equals Pillow's `Image.resize` byte for byte on
//! every case of `tests/data/pil-resize` (made by `tools/pil_reference.py`
//! with Pillow 13.0: seven inputs from 1x1 to 120x90, up- and down-scaling,
//! odd sizes, aspect changes, one-pixel sides, all five filters; 197 cases).

use std::path::Path;

use dancegrpo::imaging::pil::{resize_rgb, Filter};
use dancegrpo::io::safetensors::SafetensorsFile;

#[test]
fn resize_matches_pillow_byte_for_byte() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pil-resize/cases.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for name in names.iter().filter(|n| n.starts_with("out.")) {
        // out.{case}.{filter}.{oh}x{ow}
        let parts: Vec<&str> = name.split('.').collect();
        let input = file.tensor(&format!("in.{}", parts[1])).unwrap();
        let filter = match parts[2] {
            "lanczos" => Filter::Lanczos,
            "bilinear" => Filter::Bilinear,
            "bicubic" => Filter::Bicubic,
            "box" => Filter::Box,
            "hamming" => Filter::Hamming,
            other => panic!("filter {other}"),
        };
        let (oh, ow) = parts[3].split_once('x').unwrap();
        let (oh, ow): (usize, usize) = (oh.parse().unwrap(), ow.parse().unwrap());
        let s = input.size();
        let pixels = Vec::<u8>::try_from(input.flatten(0, -1)).unwrap();
        let got = resize_rgb(&pixels, (s[0] as usize, s[1] as usize), (oh, ow), filter).unwrap();
        let want = Vec::<u8>::try_from(file.tensor(name).unwrap().flatten(0, -1)).unwrap();
        if got != want {
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            wrong.push(format!("{name}: {diff} of {} bytes differ", want.len()));
        }
        checked += 1;
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(checked, 197);
}
