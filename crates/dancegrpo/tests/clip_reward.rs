//! CLIP score and PickScore on a tiny seeded transformers `CLIPModel` saved in
//! the Hugging Face layout: the rewards equal a forward pass written out here
//! independently from the saved tensors; loading errors; bad inputs.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dancegrpo::io::safetensors::{write_safetensors, SafetensorsFile};
use dancegrpo::models::clip::{ClipConfig, ClipModel};
use dancegrpo::rewards::clip_score::{ClipScoreReward, ClipScoreScale};
use dancegrpo::rewards::hps::{CLIP_MEAN, CLIP_STD};
use dancegrpo::rewards::pickscore::PickScoreReward;
use dancegrpo::rewards::{Reward, RewardBatch, Score};
use dancegrpo::rng::Philox;
use dancegrpo::text::{ClipTokenizer, Padding};
use dancegrpo::weights::Source;
use tch::{Device, Kind, Tensor};

const PROMPTS: [&str; 3] = ["a red bicycle", "two cats on a sofa", "a red bicycle"];

/// A tiny seeded CLIP (with a non-trivial logit scale) in a fresh HF directory:
/// `config.json`, `model.safetensors`, the fixtures' `tokenizer.json`.
fn tiny_dir(name: &str) -> PathBuf {
    let dir = common::temp_dir(name);
    let mut cfg = ClipConfig::tiny();
    cfg.logit_scale_init_value = 1.5;
    let model = ClipModel::new(cfg.clone(), Source::Seeded(11), Kind::Float, Device::Cpu).unwrap();
    let mut tensors = model.parameters();
    tensors.push((
        "text_model.embeddings.position_ids".into(),
        Tensor::arange(77, (Kind::Int64, Device::Cpu)).view([1, 77]),
    ));
    write_safetensors(dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json().to_string()).unwrap();
    let case = &common::public_cases()[0];
    std::fs::copy(
        case.join("reward/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    dir
}

/// Seeded uint8 images `(3, 32, 32, 3)`: the model's input size, so the
/// processor only rescales and normalises.
fn images() -> Tensor {
    (Philox::new(3, 0).normal_tensor(&[3, 32, 32, 3]) * 50.0 + 120.0)
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
}

/// The reference forward, written from the transformers modules with plain ops.
struct Reference {
    st: SafetensorsFile,
    cfg: ClipConfig,
}

impl Reference {
    fn t(&self, name: &str) -> Tensor {
        self.st.tensor(name).unwrap()
    }

    fn ln(&self, x: &Tensor, name: &str) -> Tensor {
        let (w, b) = (
            self.t(&format!("{name}.weight")),
            self.t(&format!("{name}.bias")),
        );
        let mean = x.mean_dim(-1, true, Kind::Float);
        let var = (x - &mean).square().mean_dim(-1, true, Kind::Float);
        (x - mean) / (var + 1e-5).sqrt() * w + b
    }

    fn lin(&self, x: &Tensor, name: &str) -> Tensor {
        let y = x.matmul(&self.t(&format!("{name}.weight")).tr());
        match self.st.info(&format!("{name}.bias")) {
            Some(_) => y + self.t(&format!("{name}.bias")),
            None => y,
        }
    }

    fn layer(&self, x: &Tensor, p: &str, heads: i64, causal: bool, quick: bool) -> Tensor {
        let (b, l, d) = x.size3().unwrap();
        let hd = d / heads;
        let h = self.ln(x, &format!("{p}.layer_norm1"));
        let split = |t: Tensor| t.view([b, l, heads, hd]).permute([0, 2, 1, 3]);
        let q = split(self.lin(&h, &format!("{p}.self_attn.q_proj")));
        let k = split(self.lin(&h, &format!("{p}.self_attn.k_proj")));
        let v = split(self.lin(&h, &format!("{p}.self_attn.v_proj")));
        let mut s = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
        if causal {
            let mask = Tensor::ones([l, l], (Kind::Bool, Device::Cpu)).triu(1);
            s = s.masked_fill(&mask, f64::NEG_INFINITY);
        }
        let o = s
            .softmax(-1, Kind::Float)
            .matmul(&v)
            .permute([0, 2, 1, 3])
            .reshape([b, l, d]);
        let x = x + self.lin(&o, &format!("{p}.self_attn.out_proj"));
        let m = self.lin(
            &self.ln(&x, &format!("{p}.layer_norm2")),
            &format!("{p}.mlp.fc1"),
        );
        let m = if quick {
            &m * (&m * 1.702).sigmoid()
        } else {
            m.gelu("none")
        };
        &x + self.lin(&m, &format!("{p}.mlp.fc2"))
    }

    fn image(&self, images_u8: &Tensor) -> Tensor {
        let vc = &self.cfg.vision_config;
        let mean = Tensor::from_slice(&CLIP_MEAN.map(|x| x as f32)).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&CLIP_STD.map(|x| x as f32)).view([1, 3, 1, 1]);
        let x =
            (images_u8.permute([0, 3, 1, 2]).to_kind(Kind::Double) / 255.0).to_kind(Kind::Float);
        let x = (x - mean) / std;
        let w = self.t("vision_model.embeddings.patch_embedding.weight");
        let p = x.conv2d(
            &w,
            None::<Tensor>,
            [vc.patch_size, vc.patch_size],
            [0, 0],
            [1, 1],
            1,
        );
        let b = p.size()[0];
        let p = p.flatten(2, -1).transpose(1, 2);
        let cls = self
            .t("vision_model.embeddings.class_embedding")
            .view([1, 1, -1])
            .repeat([b, 1, 1]);
        let mut h =
            Tensor::cat(&[cls, p], 1) + self.t("vision_model.embeddings.position_embedding.weight");
        h = self.ln(&h, "vision_model.pre_layrnorm");
        for i in 0..vc.num_hidden_layers {
            let p = format!("vision_model.encoder.layers.{i}");
            h = self.layer(
                &h,
                &p,
                vc.num_attention_heads,
                false,
                vc.hidden_act == "quick_gelu",
            );
        }
        let pooled = self.ln(&h.select(1, 0), "vision_model.post_layernorm");
        self.lin(&pooled, "visual_projection")
    }

    fn text(&self, ids: &Tensor) -> Tensor {
        let tc = &self.cfg.text_config;
        let l = ids.size()[1];
        let mut h = self
            .t("text_model.embeddings.token_embedding.weight")
            .index_select(0, &ids.flatten(0, -1))
            .view([ids.size()[0], l, -1])
            + self
                .t("text_model.embeddings.position_embedding.weight")
                .narrow(0, 0, l);
        for i in 0..tc.num_hidden_layers {
            let p = format!("text_model.encoder.layers.{i}");
            h = self.layer(
                &h,
                &p,
                tc.num_attention_heads,
                true,
                tc.hidden_act == "quick_gelu",
            );
        }
        h = self.ln(&h, "text_model.final_layer_norm");
        // the first end-of-text token (49407) of each row
        let eot = ids.eq(49407).to_kind(Kind::Int).argmax(-1, false);
        let rows = Tensor::arange(ids.size()[0], (Kind::Int64, Device::Cpu));
        self.lin(&h.index(&[Some(rows), Some(eot)]), "text_projection")
    }

    fn cosines(&self, images_u8: &Tensor, ids: &Tensor) -> Vec<f32> {
        let norm = |x: Tensor| &x / x.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true);
        let (i, t) = (norm(self.image(images_u8)), norm(self.text(ids)));
        Vec::<f32>::try_from((i * t).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float))
            .unwrap()
    }
}

fn values(s: &[Score]) -> Vec<f32> {
    s.iter()
        .map(|s| match s {
            Score::Value(v) => *v,
            Score::Failed(w) => panic!("failed: {w}"),
        })
        .collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn clip_score_and_pickscore_equal_an_independent_forward() {
    let dir = tiny_dir("clip-reward");
    let reference = Reference {
        st: SafetensorsFile::open(dir.join("model.safetensors")).unwrap(),
        cfg: ClipConfig::from_file(&dir.join("config.json")).unwrap(),
    };
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let ids: Vec<i64> = PROMPTS
        .iter()
        .flat_map(|p| tok.encode(p, 77, Padding::EndOfText).unwrap().ids)
        .collect();
    let ids = Tensor::from_slice(&ids).view([3, 77]);
    let want = reference.cosines(&images(), &ids);
    let prompts: Vec<String> = PROMPTS.iter().map(|s| s.to_string()).collect();
    let images = images();
    let batch = RewardBatch {
        images: &images,
        prompts: &prompts,
    };

    let mut cos =
        ClipScoreReward::from_dir(&dir, ClipScoreScale::Cosine, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(cos.name(), "clip_score");
    let got = values(&cos.score(&batch).unwrap());
    close(&got, &want, 1e-5);
    assert!(got.iter().all(|c| c.abs() <= 1.0));
    // scored in chunks of one the result is the same
    let mut tm = ClipScoreReward::new(
        dancegrpo::rewards::clip_score::ClipScorer::from_dir(&dir, Kind::Float, Device::Cpu)
            .unwrap()
            .with_batch_size(1),
        ClipScoreScale::Torchmetrics,
    );
    let got_tm = values(&tm.score(&batch).unwrap());
    let want_tm: Vec<f32> = want.iter().map(|c| (100.0 * c).max(0.0)).collect();
    close(&got_tm, &want_tm, 1e-4);

    let mut pick = PickScoreReward::from_dir(&dir, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(pick.name(), "pickscore");
    let got = values(&pick.score(&batch).unwrap());
    let want_pick: Vec<f32> = want.iter().map(|c| 1.5f32.exp() * c).collect();
    close(&got, &want_pick, 1e-5);
}

#[test]
fn clip_loading_errors_name_the_problem() {
    let dir = tiny_dir("clip-bad");
    // a checkpoint without its vision tower
    let st = SafetensorsFile::open(dir.join("model.safetensors")).unwrap();
    let keep = |f: &dyn Fn(&str) -> bool| -> Vec<(String, Tensor)> {
        st.names()
            .filter(|n| f(n))
            .map(|n| (n.to_string(), st.tensor(n).unwrap()))
            .collect()
    };
    let text_only = keep(&|n: &str| !n.starts_with("vision_model."));
    let extra = {
        let mut all = keep(&|_| true);
        all.push((
            "vision_model.bogus.weight".into(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        ));
        all
    };
    drop(st);
    let write = |tensors: &[(String, Tensor)]| {
        write_safetensors(dir.join("model.safetensors"), tensors, &BTreeMap::new()).unwrap()
    };
    write(&text_only);
    let e = ClipModel::from_dir(&dir, Kind::Float, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lacks the vision tower"), "{e}");
    write(&extra);
    let e = ClipModel::from_dir(&dir, Kind::Float, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vision_model.bogus.weight"), "{e}");
    // an unsupported activation, a wrong model type
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision_config"]["hidden_act"] = "swish".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = ClipConfig::from_file(&cfg_path).unwrap_err().to_string();
    assert!(e.contains("vision_config.hidden_act"), "{e}");
    cfg["model_type"] = "siglip".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = ClipConfig::from_file(&cfg_path).unwrap_err().to_string();
    assert!(e.contains("model_type") && e.contains("siglip"), "{e}");
    // no weights at all
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(ClipModel::from_dir(Path::new(&dir), Kind::Float, Device::Cpu).is_err());
}

#[test]
fn clip_rewards_reject_bad_batches() {
    let dir = tiny_dir("clip-input");
    let mut r =
        ClipScoreReward::from_dir(&dir, ClipScoreScale::Cosine, Kind::Float, Device::Cpu).unwrap();
    let prompts = vec!["a".to_string()];
    let rgba = Tensor::zeros([1, 32, 32, 4], (Kind::Uint8, Device::Cpu));
    let e = r
        .score(&RewardBatch {
            images: &rgba,
            prompts: &prompts,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("(B, H, W, 3)"), "{e}");
    let two = Tensor::zeros([2, 32, 32, 3], (Kind::Uint8, Device::Cpu));
    let e = r
        .score(&RewardBatch {
            images: &two,
            prompts: &prompts,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 images but 1 prompts"), "{e}");
    // a non-square image of another size is resized and cropped, not rejected
    let wide = Tensor::full([1, 40, 90, 3], 100, (Kind::Uint8, Device::Cpu));
    let s = r
        .score(&RewardBatch {
            images: &wide,
            prompts: &prompts,
        })
        .unwrap();
    assert!(matches!(s[0], Score::Value(_)), "{s:?}");
}
