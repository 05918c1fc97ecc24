//! The FLUX.1 text encoders: loading (fixture directories, damaged checkpoints,
//! tied embeddings, stored dtypes), CLIP causality and pooling, bf16 against f32.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dancegrpo::align::errors;
use dancegrpo::io::safetensors::write_safetensors;
use dancegrpo::models::clip_text::{ClipTextConfig, ClipTextModel};
use dancegrpo::models::t5::{T5Config, T5Encoder};
use dancegrpo::weights::{Checkpoint, Source};
use dancegrpo::Error;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

fn fixture(sub: &str) -> PathBuf {
    common::public_cases()[0].join("text_encoders").join(sub)
}

/// Copies a fixture model directory into `dst`, rewriting its checkpoint through
/// `edit` (which receives and returns the named tensors).
fn rewrite_model(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(Vec<(String, Tensor)>) -> Vec<(String, Tensor)>,
) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let ck = Checkpoint::open_dir(src, "model").unwrap();
    let tensors: Vec<(String, Tensor)> = ck
        .names()
        .map(|n| (n.to_string(), ck.tensor(n).unwrap()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(dst.join("model.safetensors"), &edit(tensors), &meta).unwrap();
}

fn t5_ids(b: i64, l: i64, vocab: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(vocab, [b, l], (Kind::Int64, CPU))
}

#[test]
fn t5_and_clip_load_the_fixture_directories() {
    let t5 = T5Encoder::from_dir(&fixture("text_encoder_2"), Kind::Float, CPU).unwrap();
    assert_eq!(t5.config().d_model, 32);
    assert!(t5.config().activation().unwrap().1, "gated");
    // shared.weight, 2 blocks x 9 tensors + block 0's bias table, final norm
    assert_eq!(t5.parameters().len(), 1 + 2 * 9 + 1 + 1);
    let y = t5.forward(&t5_ids(2, 7, 265, 0), None).unwrap();
    assert_eq!(y.size(), [2, 7, 32]);
    let clip = ClipTextModel::from_dir(&fixture("text_encoder"), Kind::Float, CPU).unwrap();
    assert_eq!(clip.parameters().len(), 2 + 2 * 16 + 2);
    let ids = Tensor::from_slice(&[49406i64, 320, 1125, 49407, 49407]).view([1, 5]);
    let out = clip.forward(&ids, None).unwrap();
    assert_eq!(out.last_hidden_state.size(), [1, 5, 4]);
    assert_eq!(out.pooled.size(), [1, 4]);
}

#[test]
fn t5_missing_tensor_is_named_in_the_error() {
    let dir = common::temp_dir("t5-missing");
    let gone = "encoder.block.1.layer.1.DenseReluDense.wo.weight";
    rewrite_model(&fixture("text_encoder_2"), &dir, |t| {
        t.into_iter().filter(|(n, _)| n != gone).collect()
    });
    let err = T5Encoder::from_dir(&dir, Kind::Float, CPU).err().unwrap();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == gone),
        "{err}"
    );
    assert!(err.to_string().contains(gone), "{err}");
}

#[test]
fn t5_without_any_token_embedding_names_both_keys() {
    let dir = common::temp_dir("t5-no-embedding");
    rewrite_model(&fixture("text_encoder_2"), &dir, |t| {
        t.into_iter()
            .filter(|(n, _)| n != "shared.weight")
            .collect()
    });
    let err = T5Encoder::from_dir(&dir, Kind::Float, CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shared.weight") && err.contains("encoder.embed_tokens.weight"),
        "{err}"
    );
}

#[test]
fn t5_accepts_the_tied_embedding_copy_and_bf16_storage() {
    let reference = T5Encoder::from_dir(&fixture("text_encoder_2"), Kind::Float, CPU).unwrap();
    let ids = t5_ids(1, 9, 265, 1);
    let want = reference.forward(&ids, None).unwrap();
    // only encoder.embed_tokens.weight
    let dir = common::temp_dir("t5-embed-tokens");
    rewrite_model(&fixture("text_encoder_2"), &dir, |t| {
        t.into_iter()
            .map(|(n, t)| match n.as_str() {
                "shared.weight" => ("encoder.embed_tokens.weight".to_string(), t),
                _ => (n, t),
            })
            .collect()
    });
    let t5 = T5Encoder::from_dir(&dir, Kind::Float, CPU).unwrap();
    assert!(t5.forward(&ids, None).unwrap().equal(&want));
    // both copies, plus decoder tensors of a full T5 checkpoint: accepted, ignored
    let dir = common::temp_dir("t5-both-embeddings");
    rewrite_model(&fixture("text_encoder_2"), &dir, |mut t| {
        let shared = t
            .iter()
            .find(|(n, _)| n == "shared.weight")
            .unwrap()
            .1
            .copy();
        t.push(("encoder.embed_tokens.weight".into(), shared));
        t.push((
            "decoder.final_layer_norm.weight".into(),
            Tensor::ones([32], (Kind::Float, CPU)),
        ));
        t
    });
    let t5 = T5Encoder::from_dir(&dir, Kind::Float, CPU).unwrap();
    assert!(t5.forward(&ids, None).unwrap().equal(&want));
    // stored in bf16, run in f32: the f32 model of the bf16-rounded weights
    let dir = common::temp_dir("t5-bf16-storage");
    let rounded: Vec<(String, Tensor)> = reference
        .parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_kind(Kind::BFloat16)))
        .collect();
    rewrite_model(&fixture("text_encoder_2"), &dir, |_| rounded);
    let t5 = T5Encoder::from_dir(&dir, Kind::Float, CPU).unwrap();
    assert_eq!(t5.kind(), Kind::Float);
    let (rel, _) = errors(&t5.forward(&ids, None).unwrap(), &want);
    assert!(rel > 0.0 && rel < 2e-2, "rel {rel}");
}

#[test]
fn t5_rejects_tensors_of_another_architecture_and_bad_inputs() {
    let dir = common::temp_dir("t5-extra");
    rewrite_model(&fixture("text_encoder_2"), &dir, |mut t| {
        t.push((
            "encoder.block.2.layer.0.layer_norm.weight".into(),
            Tensor::ones([32], (Kind::Float, CPU)),
        ));
        t
    });
    let err = T5Encoder::from_dir(&dir, Kind::Float, CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("encoder.block.2.layer.0.layer_norm.weight"),
        "{err}"
    );
    let t5 = T5Encoder::new(T5Config::tiny(), Source::Seeded(3), Kind::Float, CPU).unwrap();
    assert!(t5
        .forward(&Tensor::from_slice(&[1i64, 265]).view([1, 2]), None)
        .is_err());
    assert!(t5
        .forward(&Tensor::from_slice(&[1.0f32, 2.0]).view([1, 2]), None)
        .is_err());
    assert!(T5Encoder::new(T5Config::tiny(), Source::Seeded(3), Kind::Half, CPU).is_err());
}

#[test]
fn t5_attention_mask_hides_padding_and_no_mask_attends_to_it() {
    let t5 = T5Encoder::new(T5Config::tiny(), Source::Seeded(5), Kind::Float, CPU).unwrap();
    let a = Tensor::from_slice(&[5i64, 6, 7, 1, 0, 0, 0, 0]).view([1, 8]);
    let b = Tensor::from_slice(&[5i64, 6, 7, 1, 9, 9, 9, 9]).view([1, 8]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 0, 0, 0, 0]).view([1, 8]);
    let ya = t5.forward(&a, Some(&mask)).unwrap().narrow(1, 0, 4);
    let yb = t5.forward(&b, Some(&mask)).unwrap().narrow(1, 0, 4);
    assert!(ya.allclose(&yb, 1e-6, 1e-6, false));
    // FLUX passes no mask: the padding changes every position
    let na = t5.forward(&a, None).unwrap().narrow(1, 0, 4);
    let nb = t5.forward(&b, None).unwrap().narrow(1, 0, 4);
    assert!(!na.allclose(&nb, 1e-3, 1e-3, false));
}

#[test]
fn t5_bf16_forward_is_close_to_f32() {
    let cfg = T5Config {
        num_layers: 3,
        d_model: 64,
        d_ff: 128,
        num_heads: 4,
        ..T5Config::tiny()
    };
    let ids = t5_ids(2, 40, 265, 2);
    let f = T5Encoder::new(cfg.clone(), Source::Seeded(7), Kind::Float, CPU).unwrap();
    let b = T5Encoder::new(cfg, Source::Seeded(7), Kind::BFloat16, CPU).unwrap();
    let yf = f.forward(&ids, None).unwrap();
    let yb = b.forward(&ids, None).unwrap();
    assert_eq!(yb.kind(), Kind::BFloat16);
    let (rel, _) = errors(&yb, &yf);
    assert!(rel > 0.0 && rel < 5e-2, "rel {rel}");
}

fn small_clip(eos: i64) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 1000,
        hidden_size: 16,
        intermediate_size: 32,
        num_attention_heads: 4,
        eos_token_id: eos,
        ..ClipTextConfig::tiny()
    }
}

#[test]
fn clip_is_causal_later_tokens_do_not_change_earlier_states() {
    let clip = ClipTextModel::new(small_clip(2), Source::Seeded(1), Kind::Float, CPU).unwrap();
    let a = Tensor::from_slice(&[10i64, 11, 12, 13, 14, 15, 16, 17, 18, 19]).view([1, 10]);
    let b = a.copy();
    let _ = b.get(0).get(6).fill_(500);
    let ya = clip.forward(&a, None).unwrap().last_hidden_state;
    let yb = clip.forward(&b, None).unwrap().last_hidden_state;
    let (early, _) = errors(&yb.narrow(1, 0, 6), &ya.narrow(1, 0, 6));
    assert!(early < 1e-6, "positions before the change moved: {early}");
    let (late, _) = errors(&yb.narrow(1, 6, 4), &ya.narrow(1, 6, 4));
    assert!(
        late > 1e-3,
        "positions from the change on did not move: {late}"
    );
}

#[test]
fn clip_pools_at_argmax_for_legacy_eos_and_at_first_eos_otherwise() {
    let ids = Tensor::from_slice(&[
        3i64, 999, 7, 4, 7, 7, // legacy: argmax -> 1; eos 7 -> 2
        3, 5, 6, 7, 999, 999, // legacy: first 999 -> 4; eos 7 -> 3
    ])
    .view([2, 6]);
    for (eos, want) in [(2, [1i64, 4]), (7, [2, 3])] {
        let clip =
            ClipTextModel::new(small_clip(eos), Source::Seeded(2), Kind::Float, CPU).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(clip.pool_positions(&ids)).unwrap(),
            want
        );
        let out = clip.forward(&ids, None).unwrap();
        for (row, pos) in want.iter().enumerate() {
            let r = row as i64;
            assert!(out
                .pooled
                .get(r)
                .equal(&out.last_hidden_state.get(r).get(*pos)));
        }
    }
}

#[test]
fn clip_missing_tensor_is_named_and_position_ids_buffers_are_ignored() {
    let dir = common::temp_dir("clip-missing");
    let gone = "text_model.encoder.layers.1.mlp.fc1.bias";
    rewrite_model(&fixture("text_encoder"), &dir, |t| {
        t.into_iter().filter(|(n, _)| n != gone).collect()
    });
    let err = ClipTextModel::from_dir(&dir, Kind::Float, CPU)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::MissingTensor { name, .. } if name == gone),
        "{err}"
    );
    let dir = common::temp_dir("clip-position-ids");
    rewrite_model(&fixture("text_encoder"), &dir, |mut t| {
        t.push((
            "text_model.embeddings.position_ids".into(),
            Tensor::arange(77, (Kind::Int64, CPU)).view([1, 77]),
        ));
        t
    });
    assert!(ClipTextModel::from_dir(&dir, Kind::Float, CPU).is_ok());
}

#[test]
fn clip_bf16_forward_is_close_to_f32_and_long_inputs_are_rejected() {
    let cfg = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 256,
        num_attention_heads: 4,
        ..small_clip(2)
    };
    tch::manual_seed(4);
    let ids = Tensor::randint(1000, [2, 77], (Kind::Int64, CPU));
    let f = ClipTextModel::new(cfg.clone(), Source::Seeded(9), Kind::Float, CPU).unwrap();
    let b = ClipTextModel::new(cfg, Source::Seeded(9), Kind::BFloat16, CPU).unwrap();
    let of = f.forward(&ids, None).unwrap();
    let ob = b.forward(&ids, None).unwrap();
    for (ours, reference) in [
        (&ob.last_hidden_state, &of.last_hidden_state),
        (&ob.pooled, &of.pooled),
    ] {
        let (rel, _) = errors(ours, reference);
        assert!(rel > 0.0 && rel < 5e-2, "rel {rel}");
    }
    let long = Tensor::zeros([1, 78], (Kind::Int64, CPU));
    assert!(f.forward(&long, None).is_err());
}
