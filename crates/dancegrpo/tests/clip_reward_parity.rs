//! CLIP score and PickScore equal what transformers 4.46.1 computes, resized
//! images included: a tiny `CLIPModel` and its `CLIPProcessor` saved by
//! transformers (`tests/data/clip-reward`, made by `tools/clip_reward_reference.py`
//! with Pillow 11.3), six images from 40x64 to 57x200 (up- and down-scaled,
//! non-square, one already at 56 px) and prompts with curly quotes and mojibake.

use std::path::Path;

use dancegrpo::io::safetensors::SafetensorsFile;
use dancegrpo::rewards::clip_score::{ClipScoreReward, ClipScoreScale};
use dancegrpo::rewards::pickscore::PickScoreReward;
use dancegrpo::rewards::{Reward, RewardBatch, Score};
use tch::{Device, Kind};

/// The reward of one image and prompt.
fn score(reward: &mut dyn Reward, images: &SafetensorsFile, case: &serde_json::Value) -> f64 {
    let image = images
        .tensor(case["image"].as_str().unwrap())
        .unwrap()
        .unsqueeze(0); // (1, h, w, 3)
    let prompts = vec![case["prompt"].as_str().unwrap().to_string()];
    let batch = RewardBatch {
        images: &image,
        prompts: &prompts,
    };
    match &reward.score(&batch).unwrap()[0] {
        Score::Value(v) => f64::from(*v),
        other => panic!("{other:?}"),
    }
}

#[test]
fn clip_score_and_pickscore_equal_transformers_on_resized_images() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip-reward");
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let images = SafetensorsFile::open(dir.join("images.safetensors")).unwrap();
    let (kind, cpu) = (Kind::Float, Device::Cpu);
    let mut cosine = ClipScoreReward::from_dir(&dir, ClipScoreScale::Cosine, kind, cpu).unwrap();
    let mut pick = PickScoreReward::from_dir(&dir, kind, cpu).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        for (reward, key) in [
            (&mut cosine as &mut dyn Reward, "cosine"),
            (&mut pick, "pickscore"),
        ] {
            let (got, want) = (score(reward, &images, case), case[key].as_f64().unwrap());
            let rel = (got - want).abs() / want.abs();
            assert!(
                rel <= 1e-6,
                "{key} of {}: {got} vs transformers {want} ({rel:.1e})",
                case["image"]
            );
        }
    }
}
