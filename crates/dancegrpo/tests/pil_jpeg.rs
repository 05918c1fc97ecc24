//! `rewards::jpeg` writes the same files as Pillow's `Image.save(f,
//! format="JPEG", quality=q)`, byte for byte, on every case of
//! `tests/data/pil-jpeg` (made by `tools/jpeg_reference.py` with Pillow 11.3;
//! Pillow 13.0 writes the same bytes): nine seeded inputs from 1x1 to 120x90
//! (sides that are not multiples of the 16-pixel MCU included), qualities 10 to
//! 100, 4:2:0 and 4:4:4; and the reward is the file's size in kB.

use std::path::Path;

use dancegrpo::io::safetensors::SafetensorsFile;
use dancegrpo::rewards::jpeg::{encode_rgb, JpegObjective, JpegReward, JpegSubsampling};
use dancegrpo::rewards::{Reward, RewardBatch, Score};

fn cases() -> SafetensorsFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pil-jpeg/cases.safetensors");
    SafetensorsFile::open(&path).unwrap()
}

#[test]
fn jpeg_files_equal_pillows_byte_for_byte() {
    let file = cases();
    let names: Vec<String> = file.names().map(str::to_string).collect();
    let (mut checked, mut wrong) = (0, Vec::new());
    for name in names.iter().filter(|n| n.starts_with("out.")) {
        // out.{case}.q{quality}.{420|444}
        let parts: Vec<&str> = name.split('.').collect();
        let input = file.tensor(&format!("in.{}", parts[1])).unwrap();
        let quality: u8 = parts[2].trim_start_matches('q').parse().unwrap();
        let subsampling = match parts[3] {
            "420" => JpegSubsampling::S420,
            "444" => JpegSubsampling::S444,
            other => panic!("subsampling {other}"),
        };
        let s = input.size();
        let pixels = Vec::<u8>::try_from(input.flatten(0, -1)).unwrap();
        let (h, w) = (s[0] as usize, s[1] as usize);
        let got = encode_rgb(&pixels, w, h, quality, subsampling).unwrap();
        let want = Vec::<u8>::try_from(file.tensor(name).unwrap()).unwrap();
        if got != want {
            wrong.push(format!(
                "{name}: {} bytes, Pillow {}",
                got.len(),
                want.len()
            ));
        }
        checked += 1;
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(checked, 9 * 6);
}

#[test]
fn the_reward_is_pillows_size_in_kb() {
    let file = cases();
    let images = tch::Tensor::stack(&[file.tensor("in.7").unwrap()], 0); // (1, 64, 64, 3)
    let prompts = vec!["p".to_string()];
    let batch = RewardBatch {
        images: &images,
        prompts: &prompts,
    };
    let want = file.tensor("out.7.q95.420").unwrap().size()[0] as f32 / 1000.0;
    let mut r = JpegReward::new(JpegObjective::Compressibility, 95).unwrap();
    assert_eq!(r.score(&batch).unwrap(), vec![Score::Value(-want)]);
    let want444 = file.tensor("out.7.q95.444").unwrap().size()[0] as f32 / 1000.0;
    let mut r = JpegReward::new(JpegObjective::Incompressibility, 95)
        .unwrap()
        .with_subsampling(JpegSubsampling::S444);
    assert_eq!(r.score(&batch).unwrap(), vec![Score::Value(want444)]);
    // bad sizes are refused, never handed to libjpeg
    let err = encode_rgb(&[0; 5], 1, 2, 95, JpegSubsampling::S420).unwrap_err();
    assert!(err.to_string().contains("5 bytes for a 2x1"), "{err}");
    assert!(encode_rgb(&[], 0, 0, 95, JpegSubsampling::S420).is_err());
}
