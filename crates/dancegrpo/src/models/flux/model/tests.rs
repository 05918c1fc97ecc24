//! Tests of the FLUX transformer: gradients, checkpointing, names, bf16, LoRA.
use super::*;
use crate::rng::Philox;

struct Inputs {
    z: Tensor,
    t: Tensor,
    text: Tensor,
    pooled: Tensor,
    txt_ids: Tensor,
    img_ids: Tensor,
    g: Tensor,
}

fn inputs(cfg: &FluxConfig, b: i64) -> Inputs {
    let mut rng = Philox::new(3, 0);
    Inputs {
        z: rng.normal_tensor(&[b, 16, cfg.in_channels]),
        t: Tensor::from_slice(&[0.5f32, 0.25][..b as usize]), // exact in bf16 after x1000
        text: rng.normal_tensor(&[b, 8, cfg.joint_attention_dim]),
        pooled: rng.normal_tensor(&[b, cfg.pooled_projection_dim]),
        txt_ids: crate::models::flux::packing::text_ids(8, Device::Cpu),
        img_ids: crate::models::flux::packing::image_ids(8, 8, Device::Cpu),
        g: Tensor::from_slice(&[4.0f32, 4.0][..b as usize]),
    }
}

fn flow<'a>(x: &'a Inputs) -> FlowInputs<'a> {
    FlowInputs {
        latents: &x.z,
        timestep: &x.t,
        text: &x.text,
        pooled: &x.pooled,
        text_ids: &x.txt_ids,
        image_ids: &x.img_ids,
        guidance: Some(&x.g),
    }
}

fn grads(model: &FluxTransformer, x: &Inputs, w: &Tensor) -> Vec<(String, Tensor)> {
    for (_, p) in model.parameters() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let _loss = model
        .velocity_backward(&flow(x), &mut |v| Ok((v * w).sum(Kind::Float)))
        .unwrap();
    model
        .parameters()
        .into_iter()
        .map(|(n, p)| (n, p.grad().copy()))
        .collect()
}

#[test]
fn every_parameter_gets_a_gradient_and_checkpointing_matches() {
    let cfg = FluxConfig {
        num_layers: 2,
        num_single_layers: 2,
        ..FluxConfig::tiny()
    };
    let mut model =
        FluxTransformer::new(cfg.clone(), Source::Seeded(11), Kind::Float, Device::Cpu).unwrap();
    let x = inputs(&cfg, 2);
    let w = Philox::new(5, 0).normal_tensor(&[2, 16, cfg.in_channels]);
    let plain = grads(&model, &x, &w);
    for (name, g) in &plain {
        assert!(
            g.defined() && g.abs().max().double_value(&[]) > 0.0,
            "no gradient reached {name}"
        );
    }
    model.set_checkpointing(ActivationCheckpointing::PerBlock);
    let ckpt = grads(&model, &x, &w);
    assert_eq!(plain.len(), ckpt.len());
    for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
        let (rel, _) = crate::align::errors(b, a);
        assert!(
            rel < 1e-5,
            "{name}: checkpointed gradient differs (rel {rel:e})"
        );
    }
}

#[test]
fn parameter_names_follow_diffusers_order_and_count() {
    let cfg = FluxConfig::tiny();
    let model = FluxTransformer::new(cfg, Source::Seeded(1), Kind::Float, Device::Cpu).unwrap();
    let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names[0],
        "time_text_embed.timestep_embedder.linear_1.weight"
    );
    assert_eq!(names.last().unwrap(), "proj_out.bias");
    let i = names
        .iter()
        .position(|n| n == "transformer_blocks.0.attn.add_k_proj.weight")
        .unwrap();
    assert_eq!(names[i + 4], "transformer_blocks.0.attn.add_q_proj.weight");
    assert_eq!(names.len(), 12 + 4 + 32 + 2 * 14 + 4);
}

#[test]
fn bf16_forward_follows_f32() {
    let cfg = FluxConfig::tiny();
    let f32m =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
    let bf16m =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::BFloat16, Device::Cpu).unwrap();
    let x = inputs(&cfg, 1);
    let a = tch::no_grad(|| f32m.velocity(&flow(&x))).unwrap();
    let xb = Inputs {
        z: x.z.to_kind(Kind::BFloat16),
        text: x.text.to_kind(Kind::BFloat16),
        pooled: x.pooled.to_kind(Kind::BFloat16),
        ..inputs(&cfg, 1)
    };
    let b = tch::no_grad(|| bf16m.velocity(&flow(&xb))).unwrap();
    // the velocity leaves in float32 for the SDE step
    assert_eq!(b.kind(), Kind::Float);
    let (rel, _) = crate::align::errors(&b, &a);
    assert!(rel < 5e-2, "bf16 output too far from f32: {rel}");
}

#[test]
fn bf16_compute_over_f32_weights_gives_f32_gradients() {
    let cfg = FluxConfig::tiny();
    let f32m =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
    let mut mixed =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
    mixed.set_compute_kind(Kind::BFloat16);
    let stored =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::BFloat16, Device::Cpu).unwrap();
    let x = inputs(&cfg, 2);
    let a = tch::no_grad(|| f32m.velocity(&flow(&x))).unwrap();
    let b = tch::no_grad(|| mixed.velocity(&flow(&x))).unwrap();
    assert_eq!(b.kind(), Kind::Float);
    let (rel, _) = crate::align::errors(&b, &a);
    assert!(rel > 1e-4 && rel < 5e-2, "bf16 compute vs f32: {rel}");
    // the same bfloat16 arithmetic as a model stored in bfloat16
    let xb = Inputs {
        z: x.z.to_kind(Kind::BFloat16),
        text: x.text.to_kind(Kind::BFloat16),
        pooled: x.pooled.to_kind(Kind::BFloat16),
        ..inputs(&cfg, 2)
    };
    let c = tch::no_grad(|| stored.velocity(&flow(&xb))).unwrap();
    assert!(b.equal(&c), "bf16 compute differs from bf16 storage");
    // gradients reach the float32 master weights in float32
    let w = Tensor::randn_like(&b);
    let _ = mixed
        .velocity_backward(&flow(&x), &mut |v| Ok((v * &w).sum(Kind::Float)))
        .unwrap();
    for (name, p) in mixed.parameters() {
        assert_eq!(p.kind(), Kind::Float, "{name}");
        assert_eq!(p.grad().kind(), Kind::Float, "{name}");
    }
}

#[test]
fn mismatched_inputs_are_rejected() {
    let cfg = FluxConfig::tiny();
    let model =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
    let mut x = inputs(&cfg, 1);
    x.text = Tensor::zeros([1, 8, 7], (Kind::Float, Device::Cpu));
    let err = model.velocity(&flow(&x)).err().unwrap().to_string();
    assert!(
        err.contains("joint_attention_dim 32") && err.contains("text [1, 8, 7]"),
        "{err}"
    );
}

#[test]
fn lora_starts_as_the_identity_and_trains_only_adapters() {
    let cfg = FluxConfig::tiny();
    let mut model =
        FluxTransformer::new(cfg.clone(), Source::Seeded(2), Kind::Float, Device::Cpu).unwrap();
    let x = inputs(&cfg, 2);
    let before = tch::no_grad(|| model.velocity(&flow(&x))).unwrap();
    let lcfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let n = model.attach_lora(&lcfg, 7).unwrap();
    // double block: 8 attention + 4 feed-forward; each single block: q, k, v, proj_mlp
    assert_eq!(n, 12 + 2 * 4);
    let after = tch::no_grad(|| model.velocity(&flow(&x))).unwrap();
    assert!(
        before.equal(&after),
        "B = 0: the adapted model equals the base"
    );
    let names: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
    assert!(names.contains(&"transformer_blocks.0.attn.to_q.lora_A.weight".to_string()));
    let w = Tensor::ones_like(&before);
    let g = grads(&model, &x, &w);
    // B gets a gradient (A's is zero while B is zero)
    assert!(g
        .iter()
        .any(|(n, t)| n.ends_with("lora_B.weight")
            && t.abs().sum(Kind::Float).double_value(&[]) > 0.0));
    assert!(model
        .base_parameters()
        .iter()
        .all(|(_, p)| !p.requires_grad()));
    assert!(model.attach_lora(&lcfg, 7).is_err());
    // per-block checkpointing: the frozen embeddings need no backward, and
    // the adapters get the plain backward's gradients
    let plain = grads(&model, &x, &w);
    model.set_checkpointing(ActivationCheckpointing::PerBlock);
    let blocked = grads(&model, &x, &w);
    for ((n, a), (_, b)) in plain.iter().zip(&blocked) {
        let (rel, _) = crate::align::errors(b, a);
        assert!(rel < 1e-5, "{n}: {rel}");
    }
}
