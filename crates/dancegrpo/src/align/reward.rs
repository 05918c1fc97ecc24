//! The `reward` stage: the HPSv2 transform of the stored `decode/image_uint8`,
//! image features of the stored `reward/pixel_values`, text features of the stored
//! `reward/input_ids`, and the rewards, with the open_clip model loaded once from
//! the HPSv2 `.pt` checkpoint and once from safetensors (tensor names end in
//! ` (pt)` / ` (safetensors)`); the two loads must give bit-identical weights.

use tch::Tensor;

use super::judge::Rule;
use super::{errors, Case, Precision, Stage, StageAcc, StageReport, TensorCheck};
use crate::error::Result;
use crate::models::open_clip::{OpenClip, OpenClipConfig};
use crate::rewards::hps::{cosine, l2_normalize, preprocess, HpsReward};
use crate::text::{batch_ids, ClipTokenizer, Padding};

/// Bound of the stage against the float32 reference when a case has no truth.
pub const TOL: f64 = 1e-6;

/// The HPSv2 checkpoint file name of the reward directory.
pub const PT_FILE: &str = "HPS_v2.1_compressed.pt";
/// The safetensors file name of the reward directory.
pub const SAFETENSORS_FILE: &str = "open_clip_model.safetensors";

/// Token ids of the captions, from `tokenizer.json` and from open_clip's merges
/// file, each required to equal the stored `reward/input_ids` exactly.
fn token_checks(case: &Case, dir: &std::path::Path, acc: &mut StageAcc) -> Result<()> {
    let want = case.expected("reward/input_ids")?;
    let captions = case.strings("sample_captions")?;
    let sources = [
        (
            "tokenizer.json",
            ClipTokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))?,
        ),
        (
            "bpe_simple_vocab_16e6.txt.gz",
            ClipTokenizer::from_open_clip_bpe(&dir.join("bpe_simple_vocab_16e6.txt.gz"))?,
        ),
    ];
    for (name, tok) in sources {
        let enc = captions
            .iter()
            .map(|c| tok.encode(c, 77, Padding::Zero))
            .collect::<Result<Vec<_>>>()?;
        let ids = batch_ids(&enc)?;
        acc.push(TensorCheck::exact(
            format!("reward/input_ids ({name}, exact)"),
            errors(&ids, &want),
            ids.size() == want.size() && ids.equal(&want),
        ));
    }
    Ok(())
}

/// Runs the stage on `case` in `precision`.
pub fn run(case: &Case, precision: Precision) -> Result<StageReport> {
    let kind = precision.frozen_kind();
    let state = precision.state_kind();
    let dir = case.dir().join("reward");
    let config = OpenClipConfig::from_dir(&dir)?;
    let dev = case.device();
    let from_pt = OpenClip::load(config.clone(), &dir.join(PT_FILE), kind, dev)?;
    let from_st = OpenClip::load(config, &dir.join(SAFETENSORS_FILE), kind, dev)?;

    let images = case.expected("decode/image_uint8")?; // (B, H, W, 3)
    let pixels_ref = case.reference("reward/pixel_values")?; // (B, 3, R, R)
    let pixels = pixels_ref.expected.to_kind(state).to_device(dev);
    let ids = case.expected("reward/input_ids")?; // (B, 77)
    let img_ref = case.reference("reward/image_features")?;
    let txt_ref = case.reference("reward/text_features")?;
    let rewards_ref = case.reference("rewards")?;
    let b = images.size()[0];

    let mut acc = StageAcc::new(Stage::Reward, Rule::new(precision, TOL));
    let _guard = tch::no_grad_guard();
    acc.compare(
        "reward/pixel_values",
        &preprocess(&images.to_device(dev), from_pt.image_size(), state)?,
        &pixels_ref,
    );
    acc.push(weights_check(&from_pt, &from_st));

    token_checks(case, &dir, &mut acc)?;

    for (suffix, model) in [("pt", from_pt), ("safetensors", from_st)] {
        // One item per model call, as the reference.
        let mut img = Vec::new();
        let mut txt = Vec::new();
        for i in 0..b {
            img.push(l2_normalize(&model.encode_image(&pixels.narrow(0, i, 1))?));
            txt.push(l2_normalize(&model.encode_text(&ids.narrow(0, i, 1))?));
        }
        let (img, txt) = (Tensor::cat(&img, 0), Tensor::cat(&txt, 0));
        acc.compare(format!("reward/image_features ({suffix})"), &img, &img_ref);
        acc.compare(format!("reward/text_features ({suffix})"), &txt, &txt_ref);
        acc.compare(
            format!("rewards ({suffix})"),
            &cosine(&img, &txt),
            &rewards_ref,
        );
        // The whole reward from the uint8 images and the captions (transform
        // and tokenizer included).
        let tokenizer = ClipTokenizer::from_dir(&dir)?;
        let tokenize = Box::new(move |text: &str| -> Result<Vec<i64>> {
            Ok(tokenizer.encode(text, 77, Padding::Zero)?.ids)
        });
        let reward = HpsReward::new(model, tokenize);
        let captions = case.strings("sample_captions")?;
        let ours = reward.score_ids(&images, &reward.tokenize(&captions)?)?;
        acc.compare_composed(
            format!("rewards from image_uint8 and captions ({suffix})"),
            &ours,
            &rewards_ref,
        );
    }
    Ok(acc.finish())
}

/// Every parameter loaded from the `.pt` must equal (bit for bit) its safetensors twin.
fn weights_check(a: &OpenClip, b: &OpenClip) -> TensorCheck {
    let (pa, pb) = (a.parameters(), b.parameters());
    let (mut rel, mut abs, mut identical) = (0.0f64, 0.0f64, pa.len() == pb.len());
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        identical &= na == nb && ta.size() == tb.size() && ta.equal(tb);
        let (r, x) = errors(ta, tb);
        rel = rel.max(r);
        abs = abs.max(x);
    }
    TensorCheck::exact(
        "weights: .pt vs safetensors (bit-identical)".into(),
        (rel, abs),
        identical,
    )
}
