//! `plan`: its byte counts equal what a process really holds for small models
//! (live tensors, every precision and training mode), and on FLUX.1-dev's
//! published configuration it says what fits where.

mod common;

use std::path::{Path, PathBuf};

use dancegrpo::grpo::{AdamW, AdamWConfig};
use dancegrpo::models::{FlowInputs, VelocityModel};
use dancegrpo::plan::{plan, MemoryPlan, PlanOptions, GIB};
use dancegrpo::train::config::TrainConfig;
use dancegrpo::train::trainer::build_models;
use tch::{Device, Kind, Tensor};

fn options(world: i64) -> PlanOptions {
    PlanOptions {
        world,
        memory: 80 << 30,
        text_len: None,
        reserve: 2 << 30,
    }
}

fn bytes(ts: &[Tensor]) -> u64 {
    ts.iter()
        .map(|t| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64)
        .sum()
}

fn line(p: &MemoryPlan, key: &str) -> u64 {
    p.lines
        .iter()
        .find(|l| l.key == key)
        .unwrap_or_else(|| panic!("no plan line {key}: {p:?}"))
        .bytes
}

/// The tiny demo configuration with `sets` applied.
fn tiny(sets: &[&str]) -> TrainConfig {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::tiny_demo()
        .with_overrides(&sets, Path::new("test"))
        .unwrap()
}

/// What a process holds after one backward pass: (trained, gradients,
/// moments, LoRA base, VAE) bytes of the live tensors.
fn live(cfg: &TrainConfig) -> [u64; 5] {
    let (model, vae) = build_models(cfg, Device::Cpu).unwrap();
    let trained: Vec<Tensor> = model.parameters().into_iter().map(|(_, p)| p).collect();
    let opt = AdamW::new(AdamWConfig::default(), &trained);
    let (m, v) = opt.moments();
    let z = Tensor::randn([1, 16, 64], (Kind::Float, Device::Cpu));
    let (text, pooled) = (
        Tensor::randn([1, 32, 32], (Kind::Float, Device::Cpu)),
        Tensor::randn([1, 4], (Kind::Float, Device::Cpu)),
    );
    let ids = |n| Tensor::zeros([n, 3], (Kind::Float, Device::Cpu));
    let (t, g) = (Tensor::from_slice(&[0.5f32]), Tensor::from_slice(&[3.5f32]));
    let (text_ids, image_ids) = (ids(32), ids(16));
    let inputs = FlowInputs {
        latents: &z,
        timestep: &t,
        text: &text,
        pooled: &pooled,
        text_ids: &text_ids,
        image_ids: &image_ids,
        guidance: Some(&g),
    };
    let _ = model
        .velocity_backward(&inputs, &mut |v| Ok(v.sum(Kind::Float)))
        .unwrap();
    let grads: Vec<Tensor> = trained.iter().map(|p| p.grad()).collect();
    assert!(grads.iter().all(|g| g.defined()));
    let base: Vec<Tensor> = match cfg.optim.lora {
        Some(_) => model
            .base_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .collect(),
        None => Vec::new(),
    };
    let vae: Vec<Tensor> = vae.parameters().into_iter().map(|(_, p)| p).collect();
    [
        bytes(&trained),
        bytes(&grads),
        bytes(m) + bytes(v),
        bytes(&base),
        bytes(&vae),
    ]
}

#[test]
fn plan_counts_equal_the_live_tensors_in_every_mode() {
    let lora = ["optim.lora.rank=4", "optim.lora.alpha=8.0"];
    for (name, sets) in [
        ("fp32 full", vec![]),
        ("bf16 full", vec!["precision.mode=bf16"]),
        ("fp32 lora", lora.to_vec()),
        ("bf16 lora", [&lora[..], &["precision.mode=bf16"]].concat()),
        (
            "bf16 lora, fp32 frozen",
            [&lora[..], &["precision.mode=bf16", "precision.frozen=fp32"]].concat(),
        ),
    ] {
        let cfg = tiny(&sets);
        assert_eq!(cfg.optim.lora.is_some(), name.contains("lora"));
        let p = plan(&cfg, &options(1)).unwrap();
        let [trained, grads, moments, base, vae] = live(&cfg);
        assert_eq!(line(&p, "trained"), trained, "{name}: trained");
        assert_eq!(line(&p, "gradients"), grads, "{name}: gradients");
        assert_eq!(line(&p, "moments"), moments, "{name}: moments");
        assert_eq!(line(&p, "frozen:VAE"), vae, "{name}: VAE");
        if cfg.optim.lora.is_some() {
            assert_eq!(
                line(&p, "frozen:transformer (LoRA base)"),
                base,
                "{name}: base"
            );
        }
        assert!(p.fits && p.total < 3 << 30);
    }
}

#[test]
fn sharding_divides_the_trained_state_by_the_process_count() {
    let per_process = |sharding: &str, world: i64| {
        let cfg = tiny(&[&format!("parallel.sharding={sharding}")]);
        let p = plan(&cfg, &options(world)).unwrap();
        line(&p, "trained") + line(&p, "gradients") + line(&p, "moments")
    };
    let one = per_process("none", 1);
    for world in [1, 2, 4] {
        assert_eq!(per_process("none", world), one);
        assert_eq!(per_process("full", world), one / world as u64);
        // ZeRO-1: weights and gradients whole, the moments (half of it) split
        assert_eq!(
            per_process("optimizer", world),
            one / 2 + one / 2 / world as u64
        );
    }
    // a process count that does not divide a step's samples is refused, naming the field
    let e = plan(&tiny(&[]), &options(3)).unwrap_err().to_string();
    assert!(e.contains("optim.gradient_accumulation"), "{e}");
}

#[test]
fn shapes_only_reward_counts_equal_the_loaded_model() {
    let case = &common::public_cases()[0];
    let dir = case.join("reward");
    let mut cfg = tiny(&[]);
    cfg.rewards =
        vec![
            dancegrpo::rewards::spec::RewardSpec::parse_cli(&format!("hpsv2:{}", dir.display()))
                .unwrap(),
        ];
    let p = plan(&cfg, &options(1)).unwrap();
    let loaded = dancegrpo::models::open_clip::OpenClip::from_dir(&dir, Kind::Float, Device::Cpu)
        .unwrap()
        .parameters();
    let loaded: Vec<Tensor> = loaded.into_iter().map(|(_, t)| t).collect();
    assert_eq!(line(&p, "frozen:rewards[0]"), bytes(&loaded));
}

/// A test-data configuration with its relative model paths made absolute.
fn flux1_dev(file: &str) -> TrainConfig {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let text = std::fs::read_to_string(data.join(file)).unwrap();
    let text = text
        .replace("\"flux1-dev\"", &format!("{:?}", data.join("flux1-dev")))
        .replace(
            "\"hpsv2-vit-h-14\"",
            &format!("{:?}", data.join("hpsv2-vit-h-14")),
        );
    let dir = common::temp_dir(file);
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    TrainConfig::load(&path, &[]).unwrap()
}

#[test]
fn flux1_dev_lora_fits_one_gpu_and_full_fine_tuning_needs_sharding() {
    let lora = plan(&flux1_dev("flux1-dev-lora.toml"), &options(1)).unwrap();
    assert_eq!(
        lora.frozen_params - 49_545_475 - 986_109_441,
        11_901_408_320
    );
    assert!(
        lora.fits,
        "LoRA bf16 at 1024x1024: {:.1} GiB",
        lora.total as f64 / GIB
    );
    assert_eq!(lora.smallest_world, Some(1));

    let full = flux1_dev("flux1-dev-full.toml");
    assert_eq!(full.precision.mode, dancegrpo::precision::ComputeMode::Bf16);
    let one = plan(&full, &options(1)).unwrap();
    assert_eq!(one.trained_params, 11_901_408_320);
    // float32 master weights, gradients and moments alone: 16 bytes per parameter
    let state = line(&one, "trained") + line(&one, "gradients") + line(&one, "moments");
    assert_eq!(state, 16 * 11_901_408_320);
    assert!(!one.fits && one.smallest_world.is_none());
    let mut sharded = full.clone();
    sharded.parallel.sharding = dancegrpo::dist::Sharding::Full;
    let eight = plan(&sharded, &options(8)).unwrap();
    assert!(
        eight.fits,
        "8 GPUs, full sharding: {:.1} GiB",
        eight.total as f64 / GIB
    );
    assert!(eight.smallest_world.unwrap() <= 8);
    assert_eq!(one.smallest_world_full, eight.smallest_world);
    // LoRA's trained adapters are a small share of the model
    let lora_cfg = flux1_dev("flux1-dev-lora.toml");
    assert_eq!(lora_cfg.optim.lora.as_ref().map(|l| l.rank), Some(64));
    assert!(lora.trained_params > 0 && lora.trained_params < 11_901_408_320 / 20);
}

/// Keeping the first window's graphs from the rollout keeps that window's
/// activations alive: the plan counts every trained transition of the
/// window's samples instead of one (the tiny demo: a window of 16 samples x 4
/// trained timesteps).
#[test]
fn rollout_graphs_count_the_whole_first_window() {
    let base = [
        "optim.activation_checkpointing=\"off\"",
        "optim.update_batching=\"per_sample\"",
    ];
    let recompute = plan(&tiny(&base), &options(1)).unwrap();
    let kept = tiny(&[&base[..], &["optim.first_window=\"rollout_graphs\""]].concat());
    let kept = plan(&kept, &options(1)).unwrap();
    let detail = |p: &MemoryPlan| {
        let l = p.lines.iter().find(|l| l.key == "activations");
        l.map(|l| l.detail.clone()).unwrap_or_default()
    };
    assert!(
        detail(&recompute).contains("update batch 1,"),
        "{}",
        detail(&recompute)
    );
    assert!(
        detail(&kept).contains("update batch 64,"),
        "{}",
        detail(&kept)
    );
    assert!(line(&kept, "activations") > line(&recompute, "activations"));
    // the demo's one window holds all 16 samples: the update skips the forward
    // of every transition, 2 of the 3 forward-equivalents left
    let (k, r) = (kept.tflop, recompute.tflop);
    assert!(
        (k.update / r.update - 2.0 / 3.0).abs() < 1e-12,
        "{k:?} {r:?}"
    );
    assert_eq!(k.rollout, r.rollout);
}

/// A process's accumulation window is its share of the global one, and with
/// the rollout's batches recomputed a rollout batch ends with that window.
#[test]
fn update_batches_are_counted_per_process() {
    let detail = |cfg: &TrainConfig, world: i64| {
        let p = plan(cfg, &options(world)).unwrap();
        let l = p.lines.iter().find(|l| l.key == "activations");
        l.map(|l| l.detail.clone()).unwrap_or_default()
    };
    // 16 samples per optimizer step over 4 processes: windows of 4 samples
    let window = tiny(&["optim.update_batching=\"window\""]);
    let (_, trained) = window
        .iteration_config()
        .update
        .trained(window.sampler.steps)
        .unwrap();
    let rows = format!("update batch {},", 4 * trained);
    assert!(detail(&window, 4).contains(&rows), "{}", detail(&window, 4));
    // the demo's rollout batches of 8 recomputed by the update: over 8
    // processes each window holds 2 samples, and so does each batch
    let rollout = tiny(&[]);
    assert!(
        detail(&rollout, 1).contains("update batch 8,"),
        "{}",
        detail(&rollout, 1)
    );
    assert!(
        detail(&rollout, 8).contains("update batch 2,"),
        "{}",
        detail(&rollout, 8)
    );
}
