//! Sharding over Gloo with 2 and 4 real processes (ZeRO-3, and ZeRO-1 with 2): a sharded model
//! computes what the whole model computes, its optimizer step lands where the
//! replicated one does, each process holds 1/N of the trained state, and its
//! checkpoint parts read back under the same or another process count.

mod common;

use std::rc::Rc;

use dancegrpo::dist::fsdp::{export, ShardManifest, ShardedModel, Split, WEIGHTS};
use dancegrpo::dist::{barrier, Collective};
use dancegrpo::grpo::{AdamW, AdamWConfig};
use dancegrpo::models::flux::packing;
use dancegrpo::models::flux::{FluxConfig, FluxTransformer};
use dancegrpo::models::{ActivationCheckpointing, FlowInputs, PolicyModel, VelocityModel};
use dancegrpo::precision::ReduceDtype;
use dancegrpo::weights::Source;
use tch::{Device, Kind, Tensor};

fn flux() -> FluxTransformer {
    let mut m = FluxTransformer::new(
        FluxConfig::tiny(),
        Source::Seeded(8),
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    m.set_checkpointing(ActivationCheckpointing::PerBlock);
    m
}

/// This rank's inputs and loss weights (different on every rank).
fn batch(rank: i64) -> (Vec<Tensor>, Tensor) {
    tch::manual_seed(100 + rank);
    let opts = (Kind::Float, Device::Cpu);
    let x = vec![
        Tensor::randn([2, 16, 64], opts),
        Tensor::rand([2], opts),
        Tensor::randn([2, 32, 32], opts),
        Tensor::randn([2, 4], opts),
        packing::text_ids(32, Device::Cpu),
        packing::image_ids(8, 8, Device::Cpu),
        Tensor::full([2], 3.5, opts),
    ];
    (x, Tensor::randn([2, 16, 64], opts))
}

fn flow(x: &[Tensor]) -> FlowInputs<'_> {
    FlowInputs {
        latents: &x[0],
        timestep: &x[1],
        text: &x[2],
        pooled: &x[3],
        text_ids: &x[4],
        image_ids: &x[5],
        guidance: Some(&x[6]),
    }
}

fn bytes(ts: &[Tensor]) -> i64 {
    ts.iter().map(|t| t.numel() as i64 * 4).sum()
}

/// One forward, one backward and one AdamW step, replicated and sharded.
fn sharded_step_matches_replicated(world: usize, name: &str, split: Split) {
    if !common::is_child() {
        return common::spawn_world(name, world);
    }
    let pg: Rc<dyn Collective> = Rc::new(common::join_gloo());
    let rank = pg.rank();
    let whole = flux();
    let sharded =
        ShardedModel::new(flux(), pg.clone(), Kind::Float, ReduceDtype::Fp32, split).unwrap();
    let (x, w) = batch(rank);
    // the forward is the same, bit for bit
    let a = tch::no_grad(|| whole.velocity(&flow(&x))).unwrap();
    let b = tch::no_grad(|| sharded.velocity(&flow(&x))).unwrap();
    assert!(a.equal(&b), "sharded forward differs");

    let loss = |v: &Tensor| Ok((v * &w).sum(Kind::Float));
    let _ = whole
        .velocity_backward(&flow(&x), &mut loss.clone())
        .unwrap();
    let _ = sharded
        .velocity_backward(&flow(&x), &mut loss.clone())
        .unwrap();
    // data parallel: all-reduce, clip, step; sharded: already reduce-scattered
    let params: Vec<Tensor> = whole.parameters().into_iter().map(|(_, p)| p).collect();
    let shards: Vec<Tensor> = sharded.parameters().into_iter().map(|(_, p)| p).collect();
    whole
        .reduce_gradients(pg.as_ref(), ReduceDtype::Fp32)
        .unwrap();
    sharded
        .reduce_gradients(pg.as_ref(), ReduceDtype::Fp32)
        .unwrap();
    let n1 = whole
        .clip_gradients(pg.as_ref(), 0.5)
        .unwrap()
        .double_value(&[]);
    let n2 = sharded
        .clip_gradients(pg.as_ref(), 0.5)
        .unwrap()
        .double_value(&[]);
    // the same norm, summed in another order
    assert!((n1 - n2).abs() <= 1e-6 * n1, "grad norms {n1} vs {n2}");
    let mut o1 = AdamW::new(AdamWConfig::default(), &params);
    let mut o2 = AdamW::new(AdamWConfig::default(), &shards);
    o1.step(&params, 1e-3);
    o2.step(&shards, 1e-3);
    sharded.parameters_changed().unwrap();
    // 1/N of the trained weights and moments (the padding aside)
    let per = bytes(&shards);
    let all = bytes(&params);
    assert!(per * world as i64 >= all && per * world as i64 <= all + 4 * 4 * 64 * world as i64);
    let (m, v) = o2.moments();
    assert_eq!(bytes(m) + bytes(v), 2 * per);

    // the stepped shards, gathered, equal the replicated weights to float32
    // rounding of the clip coefficient (1e-6 relative on any tensor)
    let state = sharded.state();
    let mut k = 0;
    for u in 0..whole.units().len() {
        for (name, t) in state.gather_unit(u).unwrap() {
            let (n, p) = &whole.parameters()[k];
            assert_eq!(&name, n);
            let rel = (&t - p).norm().double_value(&[]) / p.norm().double_value(&[]).max(1e-12);
            assert!(rel <= 1e-6, "{name}: {rel}");
            k += 1;
        }
    }
    assert_eq!(k, params.len());
    if split == Split::Optimizer {
        // ZeRO-1: the stepped parts are gathered back into the whole model
        for ((n, a), (_, b)) in whole.parameters().iter().zip(sharded.inner().parameters()) {
            let rel = (a - &b).norm().double_value(&[]) / a.norm().double_value(&[]).max(1e-12);
            assert!(rel <= 1e-6, "{n}: {rel}");
        }
    }

    // checkpoint parts: written by every process, read back exactly, and
    // consolidated by one process
    let dir = std::env::temp_dir().join(format!("dancegrpo-fsdp-{name}"));
    if rank == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
    }
    barrier(pg.as_ref()).unwrap();
    sharded.save_trained(&dir).unwrap();
    barrier(pg.as_ref()).unwrap();
    let saved: Vec<Tensor> = shards.iter().map(|s| s.detach().copy()).collect();
    let _guard = tch::no_grad_guard();
    for s in &shards {
        let _ = s.shallow_clone().zero_();
    }
    sharded.load_trained(&dir).unwrap();
    for (a, b) in shards.iter().zip(&saved) {
        assert!(a.equal(b));
    }
    let manifest = ShardManifest::read(&dir, WEIGHTS).unwrap();
    assert_eq!(manifest.world, world as i64);
    if rank == 0 {
        let out = dir.join("export");
        export(&dir, WEIGHTS, &out, 40_000).unwrap();
        // several files of at most 40 kB and diffusers' index, read by our loader
        assert!(out
            .join("diffusion_pytorch_model.safetensors.index.json")
            .is_file());
        let parts = std::fs::read_dir(&out)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy()
                    .starts_with("diffusion_pytorch_model-")
            })
            .count();
        assert!(parts > 1, "{parts} files");
        let back = FluxTransformer::from_dir(&out, Kind::Float, Device::Cpu).unwrap();
        for (n, a) in back.parameters().iter() {
            let (_, p) = whole
                .parameters()
                .into_iter()
                .find(|(m, _)| m == n)
                .unwrap();
            let rel = (a - &p).norm().double_value(&[]) / p.norm().double_value(&[]).max(1e-12);
            assert!(rel <= 1e-6, "exported {n}: {rel}");
        }
    }
    barrier(pg.as_ref()).unwrap();
}

#[test]
fn two_processes_shard_like_one() {
    sharded_step_matches_replicated(2, "two_processes_shard_like_one", Split::Everything);
}

#[test]
fn four_processes_shard_like_one() {
    sharded_step_matches_replicated(4, "four_processes_shard_like_one", Split::Everything);
}

#[test]
fn two_processes_split_the_optimizer_like_one() {
    let name = "two_processes_split_the_optimizer_like_one";
    sharded_step_matches_replicated(2, name, Split::Optimizer);
}
