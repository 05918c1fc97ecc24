//! Pretraining: the VAE encoder on the fixture's weights, a short pretrain run
//! whose losses fall and whose output directory the trainer loads (bit-identical
//! to the in-memory model), determinism, and bad output directories.

mod common;

use std::path::Path;

use dancegrpo::models::flux::{packing, FluxTransformer};
use dancegrpo::models::vae::{Vae, VaeParts};
use dancegrpo::models::{FlowInputs, VelocityModel};
use dancegrpo::pretrain::{self, PretrainConfig, StageConfig};
use dancegrpo::rng::Philox;
use dancegrpo::train::config::ModelSource;
use dancegrpo::train::trainer::{build_models, build_prompts};
use dancegrpo::train::{Resume, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

fn fixture_vae() -> std::path::PathBuf {
    common::public_cases()[0].join("vae")
}

#[test]
fn fixture_vae_loads_encoder_and_decoder_with_every_key_used() {
    let vae = Vae::from_dir_with(
        &fixture_vae(),
        VaeParts::EncoderDecoder,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let names: Vec<String> = vae.parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names[0], "encoder.conv_in.weight");
    assert!(names.contains(&"encoder.down_blocks.0.downsamplers.0.conv.weight".to_string()));
    assert!(names.contains(&"encoder.mid_block.attentions.0.to_q.weight".to_string()));
    let x = Philox::new(1, 0)
        .normal_tensor(&[2, 3, 64, 48])
        .clamp(-1.0, 1.0);
    let dist = tch::no_grad(|| vae.encode(&x)).unwrap();
    assert_eq!(dist.mean.size(), [2, 16, 8, 6]);
    assert_eq!(dist.logvar.size(), [2, 16, 8, 6]);
    // normalize is the inverse of the decode path's denormalize
    let z = vae.normalize(&dist.mean);
    let back = vae.denormalize(&z);
    assert!((back - &dist.mean).abs().max().double_value(&[]) < 1e-6);
    let decoded = tch::no_grad(|| vae.decode(&dist.mean, None));
    assert_eq!(decoded.size(), [2, 3, 64, 48]);
    // the decoder-only VAE has no encoder and the same decoder weights
    let dec = Vae::from_dir(&fixture_vae(), Kind::Float, Device::Cpu).unwrap();
    assert!(dec.encode(&x).is_err());
    let d2 = tch::no_grad(|| dec.decode(&dist.mean, None));
    assert!(d2.equal(&decoded));
}

#[test]
fn vae_save_dir_round_trips_encoder_and_decoder() {
    let dir = common::temp_dir("vae-roundtrip");
    let vae = Vae::from_dir_with(
        &fixture_vae(),
        VaeParts::EncoderDecoder,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    vae.save_dir(&dir).unwrap();
    let again =
        Vae::from_dir_with(&dir, VaeParts::EncoderDecoder, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(again.config(), vae.config());
    for ((n, a), (m, b)) in vae.parameters().iter().zip(again.parameters()) {
        assert_eq!(n, &m);
        assert!(a.equal(&b), "{n}");
    }
    // a checkpoint without the encoder is refused when the encoder is asked for
    let dec = Vae::from_dir(&fixture_vae(), Kind::Float, Device::Cpu).unwrap();
    let only_decoder = common::temp_dir("vae-decoder-only");
    dec.save_dir(&only_decoder).unwrap();
    let err = Vae::from_dir_with(
        &only_decoder,
        VaeParts::EncoderDecoder,
        Kind::Float,
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("missing tensor `encoder.conv_in.weight`"),
        "{err}"
    );
}

/// A run of a few seconds: 32x32 images, few steps, small batches.
fn short_config() -> PretrainConfig {
    PretrainConfig {
        image_size: 32,
        vae: StageConfig {
            steps: 30,
            batch: 4,
            learning_rate: 4e-3,
        },
        flow: StageConfig {
            steps: 40,
            batch: 8,
            learning_rate: 4e-3,
        },
        latent_stats_images: 16,
        sample_steps: 2,
        ..PretrainConfig::default()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The trainer's tiny default with the model directory `dir` at `size` pixels.
fn dir_config(dir: &Path, size: i64) -> TrainConfig {
    let mut cfg = TrainConfig::tiny_demo();
    cfg.model = ModelSource::Dir {
        path: dir.to_path_buf(),
    };
    (cfg.sampler.height, cfg.sampler.width) = (size, size);
    (cfg.run.iterations, cfg.sampler.steps) = (1, 3);
    cfg
}

fn velocity(
    model: &FluxTransformer,
    x: &Tensor,
    t: &Tensor,
    text: &Tensor,
    pooled: &Tensor,
) -> Tensor {
    let g = Tensor::full([x.size()[0]], 3.5, (Kind::Float, Device::Cpu));
    let inputs = FlowInputs {
        latents: x,
        timestep: t,
        text,
        pooled,
        text_ids: &packing::text_ids(text.size()[1], Device::Cpu),
        image_ids: &packing::image_ids(4, 4, Device::Cpu),
        guidance: Some(&g),
    };
    tch::no_grad(|| model.velocity(&inputs)).unwrap()
}

#[test]
fn short_pretrain_lowers_the_losses_and_the_trainer_loads_it_bit_identically() {
    tch::set_num_threads(1);
    let root = common::temp_dir("pretrain-short");
    let out = root.join("model");
    let cfg = short_config();
    let pre = pretrain::run(&cfg, &out, Device::Cpu, &mut |_| {}).unwrap();
    let r = &pre.report;
    assert_eq!((r.vae_losses.len(), r.flow_losses.len()), (30, 40));
    // first 3 steps against the last 5
    let (v0, v1) = (mean(&r.vae_losses[..3]), mean(&r.vae_losses[25..]));
    let (f0, f1) = (mean(&r.flow_losses[..3]), mean(&r.flow_losses[35..]));
    eprintln!("VAE loss {v0} -> {v1}, flow loss {f0} -> {f1}");
    assert!(v1 < 0.7 * v0, "VAE loss {v0} -> {v1}");
    assert!(f1 < 0.7 * f0, "flow loss {f0} -> {f1}");
    for f in [
        "transformer/config.json",
        "vae/config.json",
        "samples.png",
        "loss.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pretrain.json")).unwrap()).unwrap();
    assert_eq!(json["config"]["vae"]["steps"], 30);
    assert_eq!(json["losses"]["flow"].as_array().unwrap().len(), 40);
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["model"], "no temporary directory is left");

    // The trainer's loader: the same weights give bit-identical outputs.
    let tcfg = dir_config(&out, 32);
    let (model, vae) = build_models(&tcfg, Device::Cpu).unwrap();
    let mut rng = Philox::new(9, 0);
    let x = rng.normal_tensor(&[2, 4, 64]);
    let t = Tensor::from_slice(&[0.75f32, 0.3]);
    let prompts = build_prompts(&tcfg, &model).unwrap();
    let entries: Vec<_> = (0..2).map(|i| prompts.get(i).unwrap()).collect();
    let (text, pooled) = dancegrpo::data::stack(&entries);
    let ours = velocity(&pre.transformer, &x, &t, &text, &pooled);
    assert!(velocity(&model, &x, &t, &text, &pooled).equal(&ours));
    let z = rng.normal_tensor(&[2, 16, 4, 4]);
    let a = tch::no_grad(|| pre.vae.decode(&pre.vae.denormalize(&z), None));
    let b = tch::no_grad(|| vae.decode(&vae.denormalize(&z), None));
    assert!(a.equal(&b));
    assert_eq!(vae.config(), pre.vae.config());

    // and a GRPO iteration runs on it with the synthetic prompts
    let mut trainer = Trainer::new(tcfg, &root.join("run"), Resume::Fresh, Device::Cpu).unwrap();
    let m = trainer.step().unwrap();
    assert!(m.reward_mean.is_finite());
}

#[test]
fn the_vae_stage_is_deterministic() {
    tch::set_num_threads(1);
    let cfg = PretrainConfig {
        vae: StageConfig {
            steps: 3,
            batch: 2,
            learning_rate: 1e-3,
        },
        latent_stats_images: 4,
        ..short_config()
    };
    let a = pretrain::train_autoencoder(&cfg, Device::Cpu, &mut |_| {}).unwrap();
    let b = pretrain::train_autoencoder(&cfg, Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(a.losses, b.losses);
    assert_eq!(a.latents, b.latents);
    for ((n, x), (_, y)) in a.vae.parameters().iter().zip(b.vae.parameters()) {
        assert!(x.equal(&y), "{n}");
    }
}

#[test]
fn bad_output_directories_are_refused_before_training() {
    let root = common::temp_dir("pretrain-bad-out");
    let cfg = short_config();
    let mut never = |_: &pretrain::StepProgress| panic!("training started");
    let file = root.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = pretrain::run(&cfg, &file, Device::Cpu, &mut never)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("a-file") && err.contains("exists and is not a directory"),
        "{err}"
    );
    let under_file = file.join("model");
    let err = pretrain::run(&cfg, &under_file, Device::Cpu, &mut never)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("a-file"), "{err}");
    let busy = root.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), b"mine").unwrap();
    let err = pretrain::run(&cfg, &busy, Device::Cpu, &mut never)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a pretrain output"), "{err}");
    assert!(busy.join("notes.txt").is_file(), "left untouched");
    let bad = PretrainConfig {
        image_size: 20,
        ..cfg
    };
    let err = pretrain::run(&bad, &root.join("new"), Device::Cpu, &mut never)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("image_size"), "{err}");
}
